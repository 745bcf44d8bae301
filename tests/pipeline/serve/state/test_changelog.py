"""Restoring from the changelog on the real broker: from a local snapshot plus the
changelog's tail, the state equals a restore of the whole changelog.
"""

from __future__ import annotations

import random

import pytest
import structlog
from confluent_kafka import KafkaException, Producer

from pipeline.kafka.clients import producer_config
from pipeline.serve.state import UserTable, snapshot
from pipeline.serve.state.changelog import (
    changelog_ends,
    changelog_topic,
    ensure_changelog,
    restore,
    save_snapshots,
)
from pipeline.serve.state.table import CONTROL
from pipeline.tools.state_bench import full_user
from tests.pipeline.serve.state.test_snapshot import states_of

pytestmark = pytest.mark.integration

MARK = CONTROL + b"test-mark"
PARTITIONS = 3


def state(seed: int, history: int) -> bytes:
    return full_user(random.Random(seed), 1_700_000_000_000, history).to_bytes()


def produce(settings, records):
    """(partition, key, value or None) records to the changelog, acknowledged."""
    producer = Producer(producer_config(settings.kafka))
    for partition, key, value in records:
        producer.produce(changelog_topic(settings), key=key, value=value, partition=partition)
    assert producer.flush(30) == 0


def held(table: UserTable) -> dict[int, list[tuple[bytes, bytes]]]:
    """Per partition: (key, changelog value) of each user, least recently updated first."""
    return {partition: states_of(table, partition) for partition in range(PARTITIONS)}


def test_a_snapshot_plus_the_tail_restores_what_the_whole_changelog_does(kafka_settings):
    settings = kafka_settings
    history = settings.features.history_length
    directory = settings.features.snapshot_dir
    assert directory is not None
    without = settings.model_copy(
        update={"features": settings.features.model_copy(update={"snapshot_dir": None})}
    )
    ensure_changelog(settings)
    users = [(i % PARTITIONS, f"user-{i}".encode()) for i in range(30)]
    produce(settings, [(p, key, state(i, i % 7)) for i, (p, key) in enumerate(users)])
    produce(settings, [(0, MARK, b"before"), (1, b"user-1", state(99, history))])

    first = UserTable(history)
    stats = restore(settings, first, range(PARTITIONS))
    assert stats.from_snapshot == 0 and stats.records == 31  # user records only

    # Given up cleanly: each partition leaves a snapshot naming the changelog's end.
    save_snapshots(settings, first, list(range(PARTITIONS)))
    files = sorted(path.name for path in directory.iterdir())
    topic = changelog_topic(settings)
    assert files == [f"{topic}.{p}{snapshot.SUFFIX}" for p in range(PARTITIONS)]

    # A later owner wrote more: an update, a tombstone, a new user, a newer control record.
    tail = [
        (0, b"user-3", state(100, 2)),
        (1, b"user-4", None),
        (2, b"user-new", state(101, history)),
        (0, MARK, b"after"),
        (2, b"user-5", state(102, 0)),
    ]
    produce(settings, tail)

    from_snapshots = UserTable(history)
    stats = restore(settings, from_snapshots, range(PARTITIONS))
    assert stats.from_snapshot == 30  # user-1's two records are one state
    assert stats.records == 30 + len(tail) - 1  # the control record is no user state
    assert list(directory.iterdir()) == []  # each read once

    whole = UserTable(history)
    full = restore(without, whole, range(PARTITIONS))
    assert full.from_snapshot == 0
    assert held(from_snapshots) == held(whole)
    assert from_snapshots.users() == whole.users() == 30
    assert stats.controls == full.controls == {(0, MARK): b"after"}

    # No tail since: nothing is read past the snapshots. One of them holds a value that
    # is no user state (a checksum over the damage, so only the values' check sees it):
    # that partition is read from the changelog instead, and the state is the same.
    save_snapshots(settings, from_snapshots, list(range(PARTITIONS)))
    exported = from_snapshots.export(1)
    assert exported is not None and exported.users > 0
    values = exported.values.copy()
    values[exported.starts[0]] = 99  # the first user's format version
    cluster, ends = snapshot_source(settings, 1)
    snapshot.save(directory, cluster, ends, exported._replace(values=values))
    with structlog.testing.capture_logs() as entries:
        again = UserTable(history)
        stats = restore(settings, again, range(PARTITIONS))
    refused = [e for e in entries if e["event"] == "snapshot_refused"]
    assert [e["partition"] for e in refused] == [1]
    assert "not user states" in refused[0]["reason"]
    read_from_changelog = stats.records - stats.from_snapshot
    assert stats.from_snapshot == 30 - exported.users and read_from_changelog > exported.users
    assert held(again) == held(whole)
    assert list(directory.iterdir()) == []


def snapshot_source(settings, partition):
    """The Source of a changelog partition and its end offset, as a revocation names them."""
    cluster, ends = changelog_ends(settings, [partition])
    return snapshot.Source(cluster, changelog_topic(settings), partition), ends[partition]


def test_a_restore_the_broker_does_not_answer_leaves_the_snapshots_for_the_next(kafka_settings):
    settings = kafka_settings
    history = settings.features.history_length
    directory = settings.features.snapshot_dir
    ensure_changelog(settings)
    produce(settings, [(p, f"user-{p}".encode(), state(p, 3)) for p in range(PARTITIONS)])
    table = UserTable(history)
    restore(settings, table, range(PARTITIONS))
    save_snapshots(settings, table, list(range(PARTITIONS)))
    files = sorted(directory.iterdir())
    assert len(files) == PARTITIONS

    unreachable = settings.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})
    away = settings.model_copy(update={"kafka": unreachable})
    with pytest.raises(KafkaException):  # the snapshots were read while it asked
        restore(away, UserTable(history), range(PARTITIONS), timeout_s=2)
    assert sorted(directory.iterdir()) == files  # none was taken up: the next try has them

    again = UserTable(history)
    stats = restore(settings, again, range(PARTITIONS))
    assert stats.from_snapshot == PARTITIONS and stats.records == PARTITIONS
    assert held(again) == held(table)
    assert list(directory.iterdir()) == []

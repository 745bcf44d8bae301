"""The state changelog: a compacted topic partitioned like the input, one record per user.

Key: the user id. Value: the user's state bytes (`UserState.to_bytes`), or null when the
user was evicted or forgotten. A key starting with `table.CONTROL` is not a user's: it
holds the partition's own bookkeeping (the forget-topic position its state has applied).
Changelog partition p holds the users of input partition p, so a process that is assigned
input partition p restores exactly changelog partition p before it processes p's events.
Each fetched batch of records is decoded into the user table's columns in one compiled
pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from pipeline.kafka.admin import connect, topic_partitions
from pipeline.kafka.errors import kafka_error
from pipeline.kafka.messages import position
from pipeline.serve.features.table import CONTROL, UserTable
from pipeline.settings import Settings


class ChangelogError(RuntimeError):
    """The changelog topic does not match the input topic's layout."""


@dataclass(frozen=True, slots=True)
class RestoreStats:
    """What one restore read."""

    partitions: tuple[int, ...]
    records: int
    seconds: float
    controls: dict[tuple[int, bytes], bytes]  # (partition, key) -> the latest control record

    @property
    def records_per_s(self) -> float:
        """Restore rate."""
        return self.records / self.seconds if self.seconds > 0 else 0.0


def changelog_topic(settings: Settings) -> str:
    """The changelog's name: set explicitly, or derived from the group and the input."""
    return settings.topics.changelog or (
        f"{settings.consumer.group_id}.{settings.topics.input}.changelog"
    )


def ensure_changelog(settings: Settings, timeout_s: float = 30) -> str:
    """Create the compacted changelog with the input's partition count if it is missing;
    refuse one whose partition count differs (its partitions would hold the wrong users).
    """
    admin = connect(settings, timeout_s)
    name = changelog_topic(settings)
    topics = admin.list_topics(timeout=timeout_s).topics
    if settings.topics.input not in topics:
        raise ChangelogError(f"input topic {settings.topics.input!r} does not exist")
    partitions = len(topics[settings.topics.input].partitions)
    if name in topics:
        found = len(topics[name].partitions)
        if found != partitions:
            raise ChangelogError(
                f"changelog {name!r} has {found} partitions but input "
                f"{settings.topics.input!r} has {partitions}; they must match"
            )
        return name
    topic = NewTopic(
        name,
        partitions,
        settings.topics.replication_factor,
        config={"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
    )
    future = admin.create_topics([topic], operation_timeout=timeout_s)[name]
    try:
        future.result()
    except KafkaException as exc:
        if kafka_error(exc).code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    topic_partitions(admin, name, timeout_s, expected=partitions)  # restore assigns them next
    return name


def restore(
    settings: Settings,
    store: UserTable,
    partitions: Iterable[int],
    timeout_s: float = 300,
    progress: Callable[[], None] = lambda: None,
) -> RestoreStats:
    """Read changelog `partitions` from their start to their end into `store`, calling
    `progress` after each fetched batch (a liveness beat during long restores).

    Reads committed records only, so an aborted transaction's state never comes back.
    """
    wanted = tuple(sorted(partitions))
    started = time.perf_counter()
    controls: dict[tuple[int, bytes], bytes] = {}
    if not wanted:
        return RestoreStats(wanted, 0, 0.0, controls)
    topic = changelog_topic(settings)
    consumer = Consumer(
        settings.kafka.client_config()
        | {
            "group.id": f"{settings.consumer.group_id}.restore",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,  # an empty partition reports its end at once
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
        }
    )
    records = 0
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in wanted])
        marks = [
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout_s) for p in wanted
        ]
        store.expect(sum(high - low for low, high in marks))  # at most; compaction drops some
        pending = set(wanted)
        deadline = time.monotonic() + timeout_s
        batch = settings.features.restore_batch
        while pending:
            if time.monotonic() > deadline:
                raise ChangelogError(f"restore of {topic} {sorted(pending)} timed out")
            # consume() waits its whole timeout for a short batch: keep it short.
            messages = consumer.consume(batch, 0.02)
            # Per message, one comprehension for each thing the client's API makes us read.
            if any(message.error() is not None for message in messages):
                for message in messages:
                    error = message.error()
                    if error is None:
                        continue
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(error)
                    pending.discard(message.partition())
                messages = [message for message in messages if message.error() is None]
            keys = [message.key() for message in messages]
            if any(key is None or key.startswith(CONTROL) for key in keys):
                for message, key in zip(messages, keys, strict=True):
                    if key is not None and key.startswith(CONTROL):
                        value, where = message.value(), (position(message)[1], key)
                        if value is None:
                            controls.pop(where, None)
                        else:
                            controls[where] = value
                users = [
                    i
                    for i, key in enumerate(keys)
                    if key is not None and not key.startswith(CONTROL)
                ]
                messages, keys = [messages[i] for i in users], [keys[i] for i in users]
            if keys:
                store.restore(
                    cast(list[int], [message.partition() for message in messages]),  # all set
                    cast(list[bytes], keys),  # none is None now
                    [message.value() for message in messages],
                )  # one compiled pass per fetch
                records += len(keys)
            progress()
    finally:
        consumer.close()
    return RestoreStats(wanted, records, time.perf_counter() - started, controls)

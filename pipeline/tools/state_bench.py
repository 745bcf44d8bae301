"""`streamscore state bench`: state memory per user and changelog restore rate.

Users are synthetic but full: L items of history, a session of 10 items, two devices and
IPs, a country and a card, so the figures are for the largest state a user normally has.
Memory is measured with tracemalloc over a user table sized for the users, as the runner
sizes its table for `features.max_users` (its columns, the user ids and the index). A
restored user and a live one take the same slot and pool row; the two figures differ in the
pool's size. A restore knows its record count and sizes the pool once (`UserTable.expect`,
as `changelog.restore` calls it); users that arrive live grow it by doubling, and tracemalloc
counts the rows reserved and not yet used, which calloc leaves untouched and so out of RSS.
Both are measured after a small fill has imported what a fill imports. The restore rate is
end to end: records written to a fresh compacted changelog on the broker, then read back
into an empty table by the same code a rebalance runs. Then the restored table leaves a
local snapshot of each partition, as a clean revocation does, and a second empty table
restores from those (the files just written, so from the page cache, as on a restart on the
same host) and the changelog's empty tail.
"""

from __future__ import annotations

import random
import tempfile
import time
import tracemalloc
import uuid
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from pipeline.kafka.admin import admin_client, delete_topics
from pipeline.kafka.clients import producer_config
from pipeline.serve.state.changelog import (
    changelog_topic,
    ensure_changelog,
    read_through,
    restore,
    save_snapshots,
)
from pipeline.serve.state.reference import FLOAT_SLOTS, INT_SLOTS, UserState
from pipeline.serve.state.table import UserTable
from pipeline.settings import Settings
from pipeline.topics import create_topics


@dataclass(frozen=True, slots=True)
class StateBench:
    """What one state bench measured."""

    users: int
    history_length: int
    record_bytes: float
    bytes_per_user_restored: float
    bytes_per_user_live: float
    live_unused_pool_bytes_per_user: float  # of the live figure: pool rows reserved, unused
    restore_records_per_s: float
    restore_s: float
    read_through_records_per_s: float  # the client's ceiling for the restore rate
    snapshot_write_s: float
    snapshot_bytes: int
    snapshot_restore_records_per_s: float
    snapshot_restore_s: float

    def as_dict(self) -> dict[str, Any]:
        """For results files."""
        return asdict(self)


def full_user(rng: random.Random, now_ms: int, history_length: int) -> UserState:
    """A user with every part of the state filled as far as normal traffic fills it."""
    state = UserState(now_ms)
    state.ints = array("q", (now_ms - rng.randrange(10**7) for _ in range(INT_SLOTS)))
    state.floats = array("d", (rng.random() * 10 for _ in range(FLOAT_SLOTS)))
    for _ in range(history_length):
        state.history.extend((rng.randrange(50_000), rng.randrange(500)))
    state.session_items.extend(rng.randrange(50_000) for _ in range(10))
    for kind, count in zip(state.seen, (2, 2, 1, 1), strict=True):
        for _ in range(count):
            kind.extend((rng.getrandbits(32), now_ms - rng.randrange(10**7)))  # a pseudonym
    return state


def run_state_bench(settings: Settings, users: int) -> StateBench:
    """Measure memory per user and restore throughput on the configured broker."""
    length = settings.features.history_length
    rng = random.Random(7)
    now = int(time.time() * 1000)
    records = [(f"user-{i:09d}", full_user(rng, now, length).to_bytes()) for i in range(users)]
    partitions = settings.topics.partitions

    _fill(UserTable(length), records[:100], partitions)  # what a fill imports, not measured
    restored, _ = _measure(
        lambda table: _fill(table, records, partitions, sized=True), length, users
    )
    live, unused = _measure(lambda table: _fill(table, records, partitions), length, users)

    run = uuid.uuid4().hex[:10]
    topics = settings.topics.model_copy(update={"input": f"state-bench-{run}.in"})
    consumer = settings.consumer.model_copy(update={"group_id": f"state-bench-{run}"})
    features = settings.features.model_copy(update={"snapshot_dir": None})  # the changelog
    bench_settings = settings.model_copy(
        update={"topics": topics, "consumer": consumer, "features": features}
    )
    create_topics(bench_settings, [topics.input])
    try:
        changelog = ensure_changelog(bench_settings)
        producer = Producer(producer_config(bench_settings.kafka))
        for i, (user_id, value) in enumerate(records):
            while True:
                try:
                    producer.produce(changelog, key=user_id, value=value, partition=i % partitions)
                    break
                except BufferError:
                    producer.poll(0.05)
        if producer.flush(120):
            raise RuntimeError("changelog records were not all acknowledged")
        table = UserTable(length, capacity=users + 1)  # sized as the runner sizes it
        stats = restore(bench_settings, table, range(partitions))
        if stats.records != users or table.users() != users:
            raise RuntimeError(f"restored {stats.records} records for {users} users")
        started = time.perf_counter()
        if (read := read_through(bench_settings, range(partitions))) != users:
            raise RuntimeError(f"read {read} changelog records for {users} users")
        read_s = time.perf_counter() - started

        with tempfile.TemporaryDirectory(prefix="state-bench-") as directory:
            local = settings.features.model_copy(update={"snapshot_dir": Path(directory)})
            with_snapshots = bench_settings.model_copy(update={"features": local})
            started = time.perf_counter()
            save_snapshots(with_snapshots, table, list(range(partitions)))  # as a revocation
            written_s = time.perf_counter() - started
            written = sum(path.stat().st_size for path in Path(directory).iterdir())
            del table
            again = UserTable(length, capacity=users + 1)
            loaded = restore(with_snapshots, again, range(partitions))
        if loaded.from_snapshot != users or again.users() != users:
            raise RuntimeError(f"loaded {loaded.from_snapshot} snapshot states for {users} users")
    finally:  # nothing left on the broker (200,000 users left 160 MB there a run)
        delete_topics(
            admin_client(bench_settings.kafka), [topics.input, changelog_topic(bench_settings)]
        )
    return StateBench(
        users=users,
        history_length=length,
        record_bytes=sum(len(v) for _, v in records) / users,
        bytes_per_user_restored=restored / users,
        bytes_per_user_live=live / users,
        live_unused_pool_bytes_per_user=unused / users,
        restore_records_per_s=stats.records_per_s,
        restore_s=stats.seconds,
        read_through_records_per_s=users / read_s,
        snapshot_write_s=written_s,
        snapshot_bytes=written,
        snapshot_restore_records_per_s=loaded.records_per_s,
        snapshot_restore_s=loaded.seconds,
    )


def _fill(
    table: UserTable, records: list[tuple[str, bytes]], partitions: int, sized: bool = False
) -> None:
    """Add the users one fetched batch at a time; `sized`: the pool made room for all of them
    first, as a restore makes it, else it grows as the users come (by doubling, as live users
    grow it).
    """
    # Fresh copies of key and value, as a consumer hands them over, so tracemalloc counts them.
    if sized:
        table.expect(len(records))
    step = 10_000  # as restore applies them: one fetched batch at a time
    for first in range(0, len(records), step):
        chunk = range(first, min(first + step, len(records)))
        table.restore(
            [i % partitions for i in chunk],
            [records[i][0].encode() for i in chunk],
            [bytes(bytearray(records[i][1])) for i in chunk],
        )


def _measure(fill: Any, history_length: int, users: int) -> tuple[int, int]:
    """Bytes still allocated by a table after `fill` (the records list excluded), and of
    them the bytes of its pool's free rows (none was used: nothing is evicted here).
    """
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        table = UserTable(history_length, capacity=users + 1)
        fill(table)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    unused = int(table.pool.top[0]) * table.pool.row_bytes()
    del table
    return after - before, unused

"""The state changelog: a compacted topic partitioned like the input, one record per user.

Key: the user id. Value: the user's state bytes (`UserState.to_bytes`), or null when the
user was evicted or forgotten. A key starting with `table.CONTROL` is not a user's: it
holds the partition's own bookkeeping (the forget-topic position its state has applied).
Changelog partition p holds the users of input partition p, so a process that is assigned
input partition p restores exactly changelog partition p before it processes p's events.
Each fetched batch of records is decoded into the user table's columns in one compiled
pass. Where `features.snapshot_dir` holds a local snapshot of a partition (`snapshot.py`),
the restore loads it and reads only the changelog's records after it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from pipeline.kafka.admin import connect, topic_partitions, watermarks
from pipeline.kafka.clients import FETCH_QUEUE_BACKOFF_MS
from pipeline.kafka.errors import kafka_error
from pipeline.kafka.messages import position
from pipeline.logging import get_logger
from pipeline.serve.state import snapshot
from pipeline.serve.state.byteform import holds_user_states
from pipeline.serve.state.table import CONTROL, UserTable
from pipeline.settings import Settings
from schemas.errors import StreamscoreError

log = get_logger()


class ChangelogError(StreamscoreError, RuntimeError):
    """The changelog topic does not match the input topic's layout."""


@dataclass(frozen=True, slots=True)
class RestoreStats:
    """What one restore read."""

    partitions: tuple[int, ...]
    records: int  # user states applied: from snapshots, then changelog records
    seconds: float
    controls: dict[tuple[int, bytes], bytes]  # (partition, key) -> the latest control record
    from_snapshot: int = 0  # users loaded from local snapshots

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
    admin = connect(settings.kafka, timeout_s)
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
    """Read changelog `partitions` to their end into `store`, calling `progress` after each
    fetched batch (a liveness beat during long restores). A partition starts from its local
    snapshot and the records after it where there is a valid one, else from its start.

    Reads committed records only, so an aborted transaction's state never comes back.
    """
    wanted = tuple(sorted(partitions))
    started = time.perf_counter()
    controls: dict[tuple[int, bytes], bytes] = {}
    if not wanted:
        return RestoreStats(wanted, 0, 0.0, controls)
    topic = changelog_topic(settings)
    directory = settings.features.snapshot_dir
    consumer = _reader(settings)
    records = from_snapshot = 0
    try:
        # The local snapshots are read and checked on a thread while the broker is asked
        # for the changelog's offsets here, and then each while the one before is loaded.
        with ThreadPoolExecutor(1, thread_name_prefix="snapshot-read") as reader:
            taken = _take_snapshots(settings, directory, store, reader, topic, wanted)
            marks = {p: watermarks(consumer, topic, p, timeout_s) for p in wanted}
            first = {p: low for p, (low, _) in marks.items()}
            if directory is not None:
                cluster = consumer.list_topics(topic, timeout=timeout_s).cluster_id or ""
                sources = {p: snapshot.Source(cluster, topic, p) for p in wanted}
                for source, read in _load_snapshots(directory, store, taken, sources, marks):
                    first[source.partition] = read.offset
                    from_snapshot += read.state.users
                    controls.update(
                        ((source.partition, k), v) for k, v in read.state.controls.items()
                    )
        # A partition whose snapshot reaches the changelog's end (or that is empty) has
        # nothing to read: waiting for its end-of-partition event would cost a fetch
        # round trip (20 ms of a 230 ms snapshot restore in the state bench, measured).
        pending = {p for p in wanted if first[p] < marks[p][1]}
        if pending:
            consumer.assign([TopicPartition(topic, p, first[p]) for p in sorted(pending)])
        # At most; compaction drops some.
        store.expect(sum(marks[p][1] - first[p] for p in pending))
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
    store.keep_controls(controls)  # a snapshot of these partitions carries them
    seconds = time.perf_counter() - started
    return RestoreStats(wanted, from_snapshot + records, seconds, controls, from_snapshot)


def _take_snapshots(
    settings: Settings,
    directory: Path | None,
    store: UserTable,
    reader: ThreadPoolExecutor,
    topic: str,
    partitions: tuple[int, ...],
) -> deque[tuple[int, Future[snapshot.Snapshot | None]]]:
    """Start reading the local snapshots of `topic`'s `partitions` on `reader`, each file
    checked (`snapshot.take`) and its values too, in partition order; make room in `store`
    for their users.

    On the thread, the reads overlap the broker's answers and the loads: the checksum and
    the checking kernel release the GIL, so on two cores they run beside the restore
    kernel (the state bench's snapshot restore of 200,000 users, 220-235 ms before, 170-190
    ms since). `_load_snapshots` deletes each file it takes up, used or refused; a restore
    that fails before (the broker does not answer) leaves the rest for the next try.
    """
    if directory is None:
        return deque()
    max_age_s = settings.features.snapshot_max_age_s
    snapshot.prune(directory, max_age_s)
    sources = [snapshot.Source("", topic, p) for p in partitions]  # the cluster comes later
    users = sum(snapshot.users_in(directory, source) for source in sources)
    taken = deque(
        (p, reader.submit(_take_checked, directory, topic, p, max_age_s)) for p in partitions
    )
    # Room for them all at once: growing the pool as they come copies it each time. After
    # the reads start: zeroing that room took 7-20 ms here, beside the first file's read.
    store.expect(users)
    return taken


def _take_checked(
    directory: Path, topic: str, partition: int, max_age_s: float
) -> snapshot.Snapshot | None:
    """`snapshot.take`, refusing a snapshot whose values are not user states."""
    found = snapshot.take(directory, topic, partition, max_age_s)
    if found is not None and not holds_user_states(found.state):
        snapshot.refuse(found.source, f"partition {partition}'s values are not user states")
        return None
    return found


def _load_snapshots(
    directory: Path,
    store: UserTable,
    taken: deque[tuple[int, Future[snapshot.Snapshot | None]]],
    sources: dict[int, snapshot.Source],
    marks: dict[int, tuple[int, int]],
) -> Iterator[tuple[snapshot.Source, snapshot.Snapshot]]:
    """Load each snapshot `_take_snapshots` read that fits its changelog partition (its
    `sources`, the offsets in `marks`) into `store`, yielding each one loaded; each file
    is deleted once taken up (a snapshot is read once).
    """
    while taken:
        partition, future = taken.popleft()
        source = sources[partition]
        try:
            found = future.result()
            if found is None or not snapshot.fits(found, source, *marks[partition]):
                continue
            try:
                store.load(partition, found.state, checked=True)
            except ValueError as refused:
                snapshot.refuse(source, str(refused))
                continue
        finally:
            snapshot.path_of(directory, source).unlink(missing_ok=True)
        yield source, found


def save_snapshots(settings: Settings, store: UserTable, partitions: list[int]) -> None:
    """Write a local snapshot of each of `partitions` into `features.snapshot_dir` (if
    set), naming the changelog's end: their changelog records must all be acknowledged.
    A snapshot only saves a later restore time, so one that cannot be written is logged
    and skipped.
    """
    directory = settings.features.snapshot_dir
    if directory is None or not partitions:
        return
    topic = changelog_topic(settings)
    try:
        cluster, ends = changelog_ends(settings, partitions)
        for partition in partitions:
            state = store.export(partition)
            if state is None:  # changes no batch has carried: the changelog lags
                log.info("snapshot_skipped", partition=partition, reason="pending changes")
                continue
            started = time.perf_counter()
            source = snapshot.Source(cluster, topic, partition)
            path = snapshot.save(directory, source, ends[partition], state)
            log.info(
                "snapshot_written",
                partition=partition,
                users=state.users,
                offset=ends[partition],
                seconds=round(time.perf_counter() - started, 3),
                path=str(path),
            )
        features = settings.features
        snapshot.prune(directory, features.snapshot_max_age_s, features.snapshot_max_bytes)
    except (KafkaException, OSError) as failed:
        log.warning("snapshot_not_written", partitions=partitions, reason=str(failed))


def read_through(settings: Settings, partitions: Iterable[int], timeout_s: float = 300) -> int:
    """Read changelog `partitions` from their start to their end with the consumer and the
    fetch size a restore uses, keeping nothing; return the records read. What the client
    alone costs a restore: the state bench's ceiling for its restore rate.
    """
    topic = changelog_topic(settings)
    pending = set(partitions)
    consumer = _reader(settings)
    records = 0
    try:
        # From the low watermark, as a restore starts: OFFSET_BEGINNING would first wait
        # out an offset lookup (half a second here, measured).
        starts = [
            TopicPartition(topic, p, watermarks(consumer, topic, p, timeout_s)[0]) for p in pending
        ]
        consumer.assign(starts)
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise ChangelogError(f"reading {topic} {sorted(pending)} timed out")
            messages = consumer.consume(settings.features.restore_batch, 0.02)
            records += len(messages)
            for message in messages:
                error = message.error()
                if error is None:
                    continue
                records -= 1
                if error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                pending.discard(message.partition())
    finally:
        consumer.close()
    return records


def changelog_ends(settings: Settings, partitions: Iterable[int]) -> tuple[str, dict[int, int]]:
    """The cluster's id and the changelog's end offset of each of `partitions`, asked by a
    consumer of its own: the pipeline's consumer must not make broker calls from inside its
    rebalance callbacks, where this is needed (confluent-kafka aborts the process).
    """
    topic = changelog_topic(settings)
    consumer = _reader(settings)
    try:
        cluster = consumer.list_topics(topic, timeout=10).cluster_id or ""
        ends = {p: watermarks(consumer, topic, p)[1] for p in partitions}
    finally:
        consumer.close()
    return cluster, ends


def _reader(settings: Settings) -> Consumer:
    """A consumer of the changelog outside the group: it never subscribes or commits."""
    return Consumer(
        settings.kafka.client_config()
        | {
            "group.id": f"{settings.consumer.group_id}.restore",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,  # an empty partition reports its end at once
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
        }
    )

"""Consume: the group member's consumer, and what decides whether it fetches.

`open_consumer` builds it from `consumer_config` (cooperative-sticky assignment, manual
commits, read_committed) with the callbacks that report commits, client errors and
librdkafka's statistics. `Backpressure` pauses fetching while too many outputs await
acknowledgement or while the input is held for an unavailable dependency, and
`RegistryHold` times the retries of that hold. `Partitions` owns the assignment: the
rebalance callbacks, and each partition's state restored, dropped or rolled back. The loop
that drives them is `runner.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from pipeline.kafka.clients import consumer_config
from pipeline.kafka.errors import on_client_error
from pipeline.logging import get_logger
from pipeline.serve.commit import Checkpoint, CommitReports, Rewind
from pipeline.serve.counts import RunStats
from pipeline.serve.forget import Forgetter
from pipeline.serve.state.changelog import ChangelogError, restore, save_snapshots
from pipeline.serve.state.table import UserTable
from pipeline.settings import Settings
from pipeline.telemetry import Telemetry

log = get_logger()
REWIND_LOOKUP_S = 5.0  # each try of a rewind's committed-offsets lookup; then it tries again


def open_consumer(
    settings: Settings, on_stats: Callable[[str], None], on_commit: CommitReports
) -> Consumer:
    """The pipeline's consumer, not yet subscribed; librdkafka's statistics go to `on_stats`
    every `telemetry.statistics_interval_ms`, the results of offset commits to `on_commit`.
    """
    return Consumer(
        consumer_config(settings.kafka, settings.consumer)
        | {
            "error_cb": on_client_error,
            "on_commit": on_commit,
            "stats_cb": on_stats,
            "statistics.interval.ms": settings.telemetry.statistics_interval_ms,
        }
    )


def take_batch(consumer: Consumer, max_batch: int, wait_s: float) -> list[Message]:
    """The next micro-batch: what the consumer has fetched already, up to `max_batch`; with
    nothing fetched, the first message within `wait_s` and what came with it.

    A batch never waits to fill. `consume(n, timeout)` returns early only with n messages,
    so a batch of a live stream used to sit until its window closed (up to `wait_s` with
    its first events already there). Fetches arrive whole (librdkafka queues a fetched
    partition's messages at once), so a batch is about one fetch at moderate load and
    `max_batch` under a backlog.
    """
    messages = consumer.consume(max_batch, 0)
    if messages or wait_s <= 0:
        return messages
    first = consumer.poll(wait_s)
    if first is None:
        return []
    return [first, *consumer.consume(max_batch - 1, 0)] if max_batch > 1 else [first]


class Backpressure:
    """Pauses fetching while too many outputs await acknowledgement (resuming at half), and
    while the input is held for an unavailable dependency (`hold` until `release`).

    The consumer keeps polling while paused, so it stays in its group.
    """

    def __init__(self, max_in_flight: int) -> None:
        """Pause above `max_in_flight` unacknowledged outputs."""
        self._limit = max_in_flight
        self._over = False
        self.held: str | None = None  # why the input is held, if it is
        self.paused = False

    def update(self, consumer: Consumer, in_flight: int) -> bool:
        """Pause or resume `consumer` for `in_flight`; True when it has just paused."""
        if not self._over and in_flight > self._limit:
            self._over = True
            log.warning("input_paused", in_flight=in_flight, limit=self._limit)
        elif self._over and in_flight <= self._limit // 2:
            self._over = False
            log.info("input_resumed", in_flight=in_flight)
        return self._apply(consumer)

    def hold(self, consumer: Consumer, reason: str) -> None:
        """Pause `consumer` until `release`, whatever the outputs in flight."""
        self.held = reason
        self._apply(consumer)

    def release(self, consumer: Consumer) -> None:
        """End a `hold`; fetching resumes unless too many outputs are in flight."""
        self.held = None
        self._apply(consumer)

    def _apply(self, consumer: Consumer) -> bool:
        wanted = self._over or self.held is not None
        if wanted and not self.paused:
            consumer.pause(consumer.assignment())
            self.paused = True
            return True
        if not wanted and self.paused:
            consumer.resume(consumer.assignment())
            self.paused = False
        return False


class RegistryHold:
    """When the next try is due after the schema registry did not answer: the first wait is
    `backoff_s`, doubling to `max_s`, and a batch that decodes resets it.
    """

    def __init__(self, backoff_s: float, max_s: float) -> None:
        """Wait `backoff_s` after the first failure, never more than `max_s`."""
        self._first = self._next = backoff_s
        self._max = max_s
        self.retry_at = 0.0
        self._failing = False

    def failed(self) -> float:
        """A try failed: schedule the next; return the wait."""
        wait = self._next
        self.retry_at = time.monotonic() + wait
        self._next = min(2 * wait, self._max)
        self._failing = True
        return wait

    def succeeded(self) -> bool:
        """A batch decoded: the next outage starts from the first wait again. Returns
        whether this ends an outage.
        """
        ended, self._failing = self._failing, False
        self._next = self._first
        return ended

    def due(self) -> bool:
        """Whether the wait is over."""
        return time.monotonic() >= self.retry_at


def raise_if_fatal(error: KafkaError, message: Message) -> None:
    log.warning(
        "consumer_error",
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        code=error.name(),
        reason=error.str(),
    )
    if error.fatal():
        raise KafkaException(error)


class Partitions:
    """The input partitions this member owns, and their state: restored from the changelog
    on assignment, dropped on revocation or loss, rolled back to the last commit on a
    rewind. `subscribe` joins the group with these rebalance callbacks.

    Two invariants are enforced here. A partition leaving this member has its batches in
    flight finished (`settle`) and its offsets committed while it is still owned, and only
    then its state dropped. A rollback met inside a callback (the consumer is inside poll)
    is never handled there: it is kept in `rewind_due`, and the loop rewinds before it
    prepares another batch.
    """

    def __init__(
        self, settings: Settings, store: UserTable, telemetry: Telemetry, stats: RunStats
    ) -> None:
        """Partitions of `settings.topics.input` whose state lives in `store`."""
        self._settings = settings
        self._store = store
        self._telemetry = telemetry
        self._stats = stats
        self.rewind_due: str | None = None  # a rollback met in a rebalance callback
        self.forgetter: Forgetter | None = None  # set with the clients, before `subscribe`

    def subscribe(
        self,
        consumer: Consumer,
        checkpoint: Checkpoint,
        gate: Backpressure,
        settle: Callable[[], str | None],
    ) -> None:
        """Join the group. `settle` finishes the batches in flight, returning the reason of
        a rollback it met instead; `gate` keeps new partitions paused while the input is.
        """

        def on_assign(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            numbers = [tp.partition for tp in partitions]
            log.info("partitions_assigned", partitions=numbers)
            self._telemetry.rebalances.labels(kind="assign").inc()
            self.restore(numbers)
            if gate.paused:  # a held or backed-up input stays paused on new partitions
                consumer.pause(partitions)
            self._telemetry.joined()

        def on_revoke(_: Consumer, partitions: list[TopicPartition]) -> None:
            log.info("partitions_revoked", partitions=[tp.partition for tp in partitions])
            self._telemetry.rebalances.labels(kind="revoke").inc()
            self._leave(partitions, settle, checkpoint.commit, clean=True)

        def on_lost(_: Consumer, partitions: list[TopicPartition]) -> None:
            log.warning("partitions_lost", partitions=[tp.partition for tp in partitions])
            self._telemetry.rebalances.labels(kind="lost").inc()
            self._leave(partitions, settle, checkpoint.forget)

        consumer.subscribe(
            [self._settings.topics.input],
            on_assign=on_assign,
            on_revoke=on_revoke,
            on_lost=on_lost,
        )

    def _leave(
        self,
        partitions: list[TopicPartition],
        settle: Callable[[], str | None],
        seal: Callable[[list[TopicPartition]], None],
        clean: bool = False,
    ) -> None:
        """Finish the batches in flight, then `seal` the partitions (commit what was done
        on a revocation, give up the open work on a loss), then drop their state. When
        `clean` (a revocation), partitions left with everything committed leave a local
        snapshot of their state first, where `features.snapshot_dir` is set.
        """
        self.rewind_due = settle() or self.rewind_due
        numbers = [tp.partition for tp in partitions]
        try:
            seal(partitions)
            if clean and self.rewind_due is None:
                self.save(numbers)
        except Rewind as rewind:  # the kept partitions roll back too: the loop rewinds them
            self.rewind_due = str(rewind)
        finally:
            self.drop(numbers)

    def save(self, partitions: list[int]) -> None:
        """Leave a snapshot of each of `partitions`, whose changelog records are all
        acknowledged (`features.snapshot_dir`).
        """
        save_snapshots(self._settings, self._store, partitions)

    def restore(self, partitions: list[int]) -> None:
        """Restore `partitions`' state, then apply the erasure requests it has not seen."""
        self._telemetry.restoring(True)
        try:
            stats = restore(self._settings, self._store, partitions, progress=self._telemetry.beat)
            if self.forgetter is not None:
                self.forgetter.assigned(partitions, stats.controls)
        finally:
            self._telemetry.restoring(False)
        self._stats.restored += stats.records
        self._stats.restore_s += stats.seconds
        self._telemetry.restored.labels(source="snapshot").inc(stats.from_snapshot)
        self._telemetry.restored.labels(source="changelog").inc(stats.records - stats.from_snapshot)
        self._telemetry.restore_seconds.observe(stats.seconds)
        log.info(
            "state_restored",
            partitions=list(stats.partitions),
            records=stats.records,
            from_snapshot=stats.from_snapshot,
            seconds=round(stats.seconds, 3),
            records_per_s=round(stats.records_per_s),
            users=self._store.users(),
        )

    def drop(self, partitions: list[int]) -> None:
        """Forget the state of partitions this process no longer owns."""
        for partition in partitions:
            self._store.drop_partition(partition)
        if self.forgetter is not None:
            self.forgetter.revoked(partitions)

    def rewind(self, consumer: Consumer, reason: str) -> None:
        """Roll state and input back to the last committed transaction (the caller has
        discarded the batches in flight).
        """
        self.rewind_due = None
        self._stats.rewinds += 1
        assignment = consumer.assignment()
        partitions = [tp.partition for tp in assignment]
        log.warning("rewinding_to_last_commit", reason=reason, partitions=partitions)
        for partition in partitions:
            self._store.drop_partition(partition)
        try:
            # The committed offsets first, each try short: a restore is only worth reading
            # once they answer. A chaos run on the 3-node cluster waited 30 s in one lookup
            # while the group coordinator restarted.
            committed = consumer.committed(assignment, timeout=REWIND_LOOKUP_S)
            self.restore(partitions)
        except (KafkaException, ChangelogError) as exc:
            # A broker outage (the changelog's or the group coordinator's) is no reason to
            # stop: the loop rewinds again before it prepares another batch.
            self.rewind_due = reason
            log.warning("rewind_retrying", reason=reason, error=str(exc), retry_in_s=1.0)
            time.sleep(1.0)
            return
        reset = (
            OFFSET_BEGINNING
            if self._settings.consumer.auto_offset_reset == "earliest"
            else OFFSET_END
        )
        for tp in committed:
            consumer.seek(
                TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else reset)
            )

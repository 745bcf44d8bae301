"""The one place that decides when input counts as done: the two delivery guarantees.

**At least once** (`AtLeastOnce`): every interval the batches since the last checkpoint are
sealed as one stretch; the stretch's input offsets are committed once its outputs, then the
changelog records of the users it changed, are acknowledged. The batch that closes a stretch
(`closing`) takes those records when it is prepared, for every user the stretch changed: a
user changed by several of its batches is encoded once, as the closing batch left it (0.07
records an event in the bench's workload, against 0.37 taken batch by batch): encoded then,
made into records as they are queued, `STATE_CHUNK` a tick (all at once when the next
stretch is sealed already, or when waiting). Stretches advance in order and without blocking
the loop: processing goes on while the broker acknowledges. Each user's record holds the
state as it was when the closing batch ended, so it is written only after the outputs of the
events folded into it were acknowledged, and it remembers the offset of the last of those
events. A crash replays input from the last commit; the replayed events a user's restored
state already holds are skipped (`FeatureUpdater.fresh`) and the rest see exactly the state
they saw the first time: outputs may repeat, but never with different features. A
revocation, and the stop, drain every stretch before the partitions go.

**Exactly once** (`ExactlyOnce`): each transaction holds the outputs of its batches, the
changelog records of the users they changed (taken by the batch that closes it), and their
input offsets (`send_offsets_to_transaction`). Errors are handled by class (REFERENCE §2):
a retriable one retries the call, an abortable one aborts and rewinds, a fatal one
recreates the producer (fencing the old one) and rewinds. Rewinding (`Rewind`) means: drop
the state of every assigned partition, restore it from the changelog's committed records,
and seek the consumer back to the committed offsets. A commit runs on a helper thread
while the loop prepares the next batches; the next batch's outputs, a revoke, a loss and
the stop wait for it, and its error surfaces there (or at the next `tick`).

No transactional call waits without a bound (`processing.transaction_call_timeout_ms`):
librdkafka's calls block forever by default, and on a cluster whose coordinator dies
mid-commit one did (issue #48: an EndTxn timed out, then the instance was silent until
`max.poll.interval.ms` expelled it). A call still failing at the bound, or an abort that
fails in turn (fenced after an epoch bump), replaces the producer; a commit thread that
does not return at all (librdkafka #5456: `send_offsets_to_transaction` can ignore its
timeout) is abandoned with its producer. A producer that cannot be replaced within the
bound raises `TransactionsFailed`: the process exits, naming the cause, for its
supervisor to restart it. After `close` nothing touches the producer again.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from pipeline.kafka.admin import topic_partitions
from pipeline.kafka.clients import LINGER_MS, producer_config
from pipeline.kafka.errors import kafka_error, on_client_error
from pipeline.kafka.messages import position
from pipeline.kafka.transactions import CALL_BOUND_S, transactional_call
from pipeline.logging import get_logger
from pipeline.serve.produce import AT_LEAST_ONCE_PRODUCER, Sink, Unacked
from pipeline.serve.state.changes import StateChange
from pipeline.settings import Settings
from schemas.errors import StreamscoreError

log = get_logger()
# How much longer than the bound the loop waits for a commit thread before abandoning it.
ABANDON_GRACE_S = 5.0
# Bounded tries of a process's first init_transactions while its error is retriable. At
# start the id's previous transaction (a killed instance's, under static membership) is
# aborted first, which waits for every partition it touched to have a leader: the chaos
# run saw CONCURRENT_TRANSACTIONS for over 30 s while a node was down, and exit 3 each
# time. A replacement mid-run still gets one try: its failure is issue #48's stall.
STARTUP_TRIES = 3
# At-least-once queues a sealed stretch's changelog records this many a tick: at 133,000
# events/s (the bench's events, one process) a stretch's 7,643 went out over eight loop
# iterations, 0.7-3.8 ms each, where one iteration had spent 4-11 ms on them all.
STATE_CHUNK = 1000
# With the input idle (no batch in flight), at-least-once sends what is queued at once and
# waits this long at most for its acknowledgement, instead of letting it linger LINGER_MS: a
# batch's outputs are queued together, so the linger only delays them, and the loop has
# nothing else to do meanwhile (input fetched during the wait waits in librdkafka). At
# 10,000 events/s (the bench's latency phase alone, one process, two alternating pairs) it
# took p50 from 25.3 to 23.2 ms and p99 from 39.8 to 37.2-38.0, at the same 21% of a core.
IDLE_SEND_S = LINGER_MS / 1000


class CommitReports:
    """The consumer's `on_commit` callback: logs a failed offset commit and remembers it
    until at-least-once commits again (`AtLeastOnce` clears `failed` as it does).

    Every commit carries each owned partition's safe offset, so the next stretch's commit
    makes a failed one good; a failure with no input after it (a commit refused during a
    rebalance, then an idle input) is made good by committing again every interval.
    """

    def __init__(self) -> None:
        self.failed = False

    def __call__(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if error is not None and error.code() == KafkaError._NO_OFFSET:
            return  # nothing to commit is not a failure
        failed = [tp.partition for tp in partitions if tp.error is not None]
        if error is not None or failed:
            self.failed = True
            log.warning(
                "commit_failed",
                reason=error.str() if error is not None else "partition errors",
                partitions=failed,
            )


class Rewind(Exception):
    """Control flow, not a failure to report: the batch in hand was rolled back, so the
    loop rewinds state and input to the last commit and goes on. Deliberately not a
    `StreamscoreError`: catching every error must not swallow a rewind.
    """


class TransactionsFailed(StreamscoreError):
    """Exactly-once cannot go on in this process: a producer could not be (re)initialised
    for its transactional id within the bound. Nothing uncommitted is lost (the partitions'
    next owner reads it again); the process should exit for its supervisor to restart it.
    """


Offsets = dict[tuple[str, int], int]  # (topic, partition) -> the next offset to consume


class Progress:
    """Whether a checkpoint moves: how long processed input has waited for a commit that
    has not come. The liveness probe reads it (`Health.watch`): a loop that still beats
    but commits nothing (rewinding over and over, a commit failing at every try) is not
    alive either.
    """

    def __init__(self) -> None:
        """Nothing waits yet."""
        self._since = time.monotonic()
        self._waiting = False

    def waiting(self) -> None:
        """Processed input now waits for a commit (the clock starts if it was not running)."""
        if not self._waiting:
            self._since = time.monotonic()
            self._waiting = True

    def committed(self, waiting: bool) -> None:
        """A commit completed; `waiting`: input processed after it still waits."""
        self._since = time.monotonic()
        self._waiting = waiting

    def stalled_s(self) -> float:
        """Seconds since the last commit while input waits for one; 0 when none waits."""
        return time.monotonic() - self._since if self._waiting else 0.0


def next_offsets(messages: list[Message]) -> Offsets:
    """The offsets to commit after `messages` (those without an error), per partition."""
    offsets: Offsets = {}
    for message in messages:
        if message.error() is None:
            topic, partition, offset = position(message)
            offsets[(topic, partition)] = max(offsets.get((topic, partition), 0), offset + 1)
    return offsets


class Checkpoint(Protocol):
    """How a delivery guarantee brackets batches and commits progress."""

    sink: Sink  # where this batch's outputs go (exactly-once replaces it with the producer)
    progress: Progress  # for the liveness probe

    def closing(self) -> bool:
        """Whether the batch being prepared now closes the open stretch (or transaction):
        if so, the caller takes the state's changelog records right after its features and
        hands them to its `end_batch`. Asked once per batch, in input order.
        """
        ...

    def begin_batch(self) -> None:
        """Before the batch's outputs are produced."""
        ...

    def end_batch(self, offsets: Offsets, changes: Sequence[StateChange] | None) -> None:
        """After the batch's outputs are produced; `offsets` are the batch's next offsets.
        `changes`: for a closing batch, the changelog records of every user changed since
        the last closing batch, as this batch left them; None for the others, whose changes
        stay in the state until then. May raise Rewind.
        """
        ...

    def committing(self) -> bool:
        """Whether a commit is under way that the next batch's outputs must wait for: the
        loop may prepare further batches meanwhile.
        """
        ...

    def tick(self, idle: bool) -> None:
        """Between batches: move progress towards durable without waiting on the broker.
        `idle`: no batch is in flight, so the state is the finished batches' and a stretch
        that is due may close here, taking its changes itself.
        """
        ...

    def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Make everything processed so far durable, waiting for it; `partitions` are about
        to be revoked and are not committed again afterwards.
        """
        ...

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop progress of lost partitions without committing it."""
        ...

    def close(self) -> None:
        """Release the producer."""
        ...


class _Interval:
    """When a stretch or transaction closes: once `interval_ms` has passed since the last."""

    def __init__(self, interval_ms: int) -> None:
        self._seconds = interval_ms / 1000.0
        self._last = time.monotonic()

    def passed(self) -> bool:
        """True, and counting from now, when the interval has passed since the last True."""
        now = time.monotonic()
        if now - self._last < self._seconds:
            return False
        self._last = now
        return True


@dataclass(slots=True)
class _Stretch:
    """The batches between two checkpoints."""

    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # next, per partition
    changes: Sequence[StateChange] = field(default_factory=list)  # set when sealed
    outputs: Unacked | None = None  # set when sealed
    state: Unacked | None = None  # set when its first changelog records are queued
    queued: int = 0  # of `changes`, how many are queued so far


class AtLeastOnce:
    """Close a stretch every `interval_ms`; commit it once its outputs, then its changed
    state, are acknowledged.
    """

    def __init__(
        self,
        consumer: Consumer,
        sink: Sink,
        interval_ms: int,
        take_changes: Callable[[], Sequence[StateChange]],
        reports: CommitReports,
    ) -> None:
        """Commit `consumer`'s progress after `sink` acknowledged outputs and state;
        `take_changes` takes the state's pending changelog records (`UserTable`), for a
        stretch closed with no batch in flight; `reports` is `consumer`'s `on_commit`.
        """
        self._consumer = consumer
        self._reports = reports
        self.sink = sink
        self._interval = _Interval(interval_ms)
        self._take_changes = take_changes
        self._open = _Stretch()
        self._sealed: deque[_Stretch] = deque()
        self._safe: dict[tuple[str, int], int] = {}  # acknowledged offsets of owned partitions
        self.progress = Progress()

    def closing(self) -> bool:
        """True once per `interval_ms`: the batch being prepared closes the stretch."""
        return self._interval.passed()

    def committing(self) -> bool:
        """Never: a stretch's commit waits for nothing, later batches are produced meanwhile."""
        return False

    def begin_batch(self) -> None:
        """Nothing to open."""

    def end_batch(self, offsets: Offsets, changes: Sequence[StateChange] | None) -> None:
        """Remember the batch's next offsets; a closing batch (`changes`, the state of the
        users the stretch changed, as this batch left them: written after the stretch's
        outputs are acknowledged) seals the stretch.
        """
        self._open.offsets.update(offsets)
        if offsets:
            self.progress.waiting()
        if changes is not None:
            self._seal(changes)

    def tick(self, idle: bool) -> None:
        """Close a due stretch when no batch is in flight (the input is idle, or each batch
        is finished before the next is prepared); commit the sealed stretches whose outputs
        and state are acknowledged, in order, without waiting for the broker, except that
        with the input idle what is queued is sent at once and its acknowledgement awaited
        up to `IDLE_SEND_S` (readers see outputs once they are acknowledged).
        """
        if idle and self.closing():
            self._seal(self._take_changes())
        if idle and self.sink.in_flight():
            self.sink.send_now(IDLE_SEND_S)
        else:
            self.sink.serve()
        self._advance(wait=False)

    def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Seal and commit everything, waiting for the broker; forget `partitions` after.
        No batch is in flight (the caller finished them).
        """
        self._seal(self._take_changes())
        self._advance(wait=True)
        for tp in partitions or ():
            self._safe.pop((tp.topic, tp.partition), None)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the offsets and unwritten state of lost partitions: their new owner has
        moved on, and neither may overwrite its progress.
        """
        lost = {(tp.topic, tp.partition) for tp in partitions}
        numbers = {partition for _, partition in lost}
        for stretch in (*self._sealed, self._open):
            for key in lost:
                stretch.offsets.pop(key, None)
            if stretch.queued < len(stretch.changes):  # what is not queued yet goes on
                rest = stretch.changes[stretch.queued :]
                stretch.changes = [c for c in rest if c.partition not in numbers]
                stretch.queued = 0
        for key in lost:
            self._safe.pop(key, None)

    def close(self) -> None:
        """Flush what is left (the final commit has normally done it) and release the
        producer.
        """
        try:
            self.sink.flush()
        finally:
            self.sink.close(timeout_s=0)

    def _seal(self, changes: Sequence[StateChange]) -> None:
        stretch, self._open = self._open, _Stretch()
        stretch.changes = changes
        stretch.outputs = self.sink.take_outputs()
        # An empty stretch still commits after a failed commit: with the input idle nothing
        # else would, and the group would keep the failed commit's offsets (found by the
        # privacy test: a commit refused in a rebalance, the two kept partitions idle).
        if stretch.offsets or stretch.changes or self._reports.failed:
            self._sealed.append(stretch)

    def _advance(self, wait: bool) -> None:
        """Walk the sealed stretches in order: outputs acknowledged → queue the changelog
        records → those acknowledged → commit. Without `wait`, stop at the first that is not
        ready; with it, flush until each is.
        """
        while self._sealed:
            head = self._sealed[0]
            assert head.outputs is not None
            if head.outputs.count and not self._acknowledged(wait):
                return
            self.sink.raise_failures()
            # A stretch's records are queued STATE_CHUNK at a time, one chunk a tick, so
            # that no batch waits behind all of them at once; all at once when waiting, or
            # when a later stretch is sealed already (the chunks fell behind).
            everything = wait or len(self._sealed) > 1
            head.state = self._queue_state(head, everything)
            if head.queued < len(head.changes):
                return
            if head.state.count and not self._acknowledged(wait):
                return
            self.sink.raise_failures()
            self._sealed.popleft()
            self._commit(head.offsets, asynchronous=not wait)

    def _queue_state(self, stretch: _Stretch, everything: bool) -> Unacked:
        """Queue the next chunk of `stretch`'s changelog records (or all that are left);
        its count of records awaiting acknowledgement.
        """
        start = stretch.queued
        if stretch.state is not None and start == len(stretch.changes):
            return stretch.state
        end = len(stretch.changes) if everything else min(start + STATE_CHUNK, len(stretch.changes))
        stretch.queued = end
        return self.sink.publish_state(stretch.changes[start:end], stretch.state)

    def _acknowledged(self, wait: bool) -> bool:
        """With `wait`, flush (every record queued so far is acknowledged, or this raises)."""
        if wait:
            self.sink.flush()
        return wait

    def _commit(self, offsets: dict[tuple[str, int], int], asynchronous: bool) -> None:
        # Every owned partition's safe offset goes in each commit, so one that failed (e.g.
        # the broker was restarting) is made good by the next.
        self._safe.update(offsets)
        self._reports.failed = False  # this commit makes good any before it
        self.progress.committed(waiting=bool(self._sealed or self._open.offsets))
        if not self._safe:
            return
        safe = [TopicPartition(t, p, o) for (t, p), o in self._safe.items()]
        try:
            if asynchronous:
                self._consumer.commit(offsets=safe, asynchronous=True)
            else:
                self._consumer.commit(offsets=safe, asynchronous=False)
        except KafkaException as exc:
            # The outputs are safe; only the progress marker failed. A crash before the next
            # commit replays this stretch, as at-least-once allows.
            error = kafka_error(exc)
            self._reports.failed = True
            log.warning("commit_failed", reason=error.str(), retriable=error.retriable())
            if error.fatal():
                raise


class ExactlyOnce:
    """Transactions that each hold the outputs, changelog records and input offsets of the
    batches of up to `interval_ms` (0: one batch). A commit costs broker round trips and
    transaction markers whatever its size, so one per batch bounded throughput; the price
    of a longer transaction is latency: read_committed readers see its outputs at commit.

    A closing batch's commit runs on a helper thread (`committing`): the loop goes on
    consuming, decoding and featurising while the broker commits, and the next batch's
    outputs wait for it (`begin_batch`). The commit blocked the loop for about half of
    each transaction interval at a backlog (6.5 of 7.4 µs an event in the produce stage
    were this wait, bench 20261127-235005).
    """

    def __init__(
        self,
        consumer: Consumer,
        make_producer: Callable[[], Producer],
        make_sink: Callable[[Producer], Sink],
        take_changes: Callable[[], Sequence[StateChange]],
        interval_ms: int = 0,
        call_timeout_s: float = CALL_BOUND_S,
        on_failure: Callable[[str], None] = lambda _: None,
    ) -> None:
        """Create the transactional producer (fencing any older one with its id);
        `take_changes` takes the state's pending changelog records (`UserTable`), for a
        transaction committed with no batch in flight. Each transactional call gives up
        after `call_timeout_s`; `on_failure` counts each failed transaction by kind
        (`abort`, `replace`, `stalled`).
        """
        self._consumer = consumer
        self._make_producer = make_producer
        self._make_sink = make_sink
        self._take_changes = take_changes
        self._interval = _Interval(interval_ms)
        self._bound_s = call_timeout_s
        self._on_failure = on_failure
        self._open = False
        self._offsets: Offsets = {}  # the open transaction's next offsets, per partition
        self._pending: Future[None] | None = None  # the commit under way, if any
        self._closed = False
        self.progress = Progress()
        self._producer, self.sink = self._start(tries=STARTUP_TRIES)

    def closing(self) -> bool:
        """True once per `interval_ms` (every batch at 0): the batch being prepared closes
        the transaction.
        """
        return self._interval.passed()

    def committing(self) -> bool:
        """Whether the last transaction's commit is still under way."""
        return self._pending is not None and not self._pending.done()

    def begin_batch(self) -> None:
        """Open a transaction unless one is open, once the last one has committed; may
        raise Rewind (that commit failed).
        """
        self._await_commit()
        if not self._open:
            self._check_open()
            try:
                transactional_call(self._producer.begin_transaction, timed=False)
            except KafkaException as exc:
                self._recover(exc)
            self._open = True
            self.progress.waiting()

    def end_batch(self, offsets: Offsets, changes: Sequence[StateChange] | None) -> None:
        """Add the offsets; a closing batch adds `changes` and starts the commit. May raise
        Rewind: a fatal error (a fence) can surface here, from the sink's poll.
        """
        try:
            self._offsets.update(offsets)
            if changes is not None:
                self.sink.publish_state(changes)
                self._commit_open()
        except KafkaException as exc:
            self._recover(exc)

    def tick(self, idle: bool) -> None:
        """Collect a finished commit (a failed one raises Rewind here, not at the next
        batch); with no batch in flight, commit an open transaction that is due (the input
        may be idle).
        """
        if self._pending is not None and (idle or self._pending.done()):
            self._await_commit()
        if idle and self._open and self.closing():
            self.commit()

    def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Commit the open transaction now, with the state's pending changes (before a
        revoke, or at stop; no batch is in flight), and wait for it; may raise Rewind.
        """
        self._check_open()
        self._await_commit()
        changes = self._take_changes()
        if changes and not self._open:
            self.begin_batch()
        if self._open:
            self.end_batch({}, changes)
        self._await_commit()

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Lost partitions' batches in an open transaction must not commit, and it holds
        the other partitions' too: abort it, and raise Rewind for the partitions kept. A
        commit under way is waited for: it was started before the loss.
        """
        self._check_open()
        self._await_commit()
        if self._open:
            self._abort_or_replace("partitions lost while a transaction was open")
            raise Rewind("partitions lost while a transaction was open")

    def close(self) -> None:
        """Abort a transaction left open, or whose commit failed (a commit under way is
        waited for, within the bound), and release the producer. Nothing is replaced or
        rewound here: the partitions' next owner reads again what was not committed. Once
        closed, a revoke's `commit` (the consumer closes after this) and `forget` raise
        Rewind without touching the producer.
        """
        if self._closed:
            return
        self._closed = True
        pending, self._pending = self._pending, None
        failed = False
        if pending is not None:
            try:
                failed = pending.exception(self._bound_s + ABANDON_GRACE_S) is not None
            except FutureTimeout:
                # Its thread is inside the producer, so nothing may call it; the thread is
                # a daemon and does not keep the process alive. The broker aborts the
                # transaction at its timeout.
                log.error("transaction_stalled", call="commit", waited_s=self._bound_s)
                return
        try:
            if failed or self._open:
                self._open = False
                # fenced, fatal or unanswered: the broker aborts it at its timeout anyway
                with contextlib.suppress(KafkaException):
                    transactional_call(self._producer.abort_transaction, bound_s=self._bound_s)
        finally:
            self.sink.close()

    def _commit_open(self) -> None:
        """Start committing the open transaction on the helper thread; the group metadata
        is this moment's (the consumer's generation fences a zombie's offsets).
        """
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._offsets.items()]
        metadata = self._consumer.consumer_group_metadata() if offsets else None
        self._pending = _in_thread(_commit, self._producer, offsets, metadata, self._bound_s)
        self._open = False
        self._offsets = {}

    def _await_commit(self) -> None:
        """Wait for the commit under way, if any, up to the bound and a grace; raise Rewind
        if it failed, or if it did not return (its producer is then abandoned).
        """
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        try:
            pending.result(self._bound_s + ABANDON_GRACE_S)
        except FutureTimeout:
            self._abandon(pending)
        except KafkaException as exc:
            self._recover(exc)
        self.sink.raise_failures()
        self.progress.committed(waiting=self._open)

    def _check_open(self) -> None:
        if self._closed:
            raise Rewind("the exactly-once checkpoint is closed: nothing more commits")

    def _start(self, tries: int = 1) -> tuple[Producer, Sink]:
        """A new producer, initialised for the transactional id (fencing the old one and
        aborting its open transaction); TransactionsFailed if that fails within the bound,
        `tries` times while its error is retriable.
        """
        producer = self._make_producer()
        try:
            for attempt in range(1, tries + 1):
                try:
                    transactional_call(producer.init_transactions, bound_s=self._bound_s)
                    break
                except KafkaException as exc:
                    if attempt == tries or not kafka_error(exc).retriable():
                        raise
                    log.warning("transactions_init_retried", reason=kafka_error(exc).str())
        except KafkaException as exc:
            with contextlib.suppress(KafkaException, RuntimeError):
                producer.close()
            self._closed = True
            reason = kafka_error(exc).str()
            log.error("transactions_failed", reason=reason)
            raise TransactionsFailed(
                "no transactional producer could be initialised within "
                f"{self._bound_s:.0f} s (processing.transaction_call_timeout_ms): {reason}"
            ) from exc
        return producer, self._make_sink(producer)

    def _recover(self, exc: KafkaException) -> None:
        """Handle a transactional call's failure once, by its class, and raise Rewind: an
        abortable one (or a retriable one still failing at the bound) aborts; a fatal one,
        or an abort that fails in turn, replaces the producer.
        """
        error = kafka_error(exc)
        if error.fatal():
            self._on_failure("replace")
            log.error("transaction_fatal", reason=error.str())
            self._replace(error.str())
        else:
            self._abort_or_replace(error.str())
        raise Rewind(error.str()) from exc

    def _abort_or_replace(self, reason: str) -> None:
        """Abort the open transaction within the bound; if the abort fails, replace the
        producer (a new one with the same id aborts the transaction as it fences this one).
        """
        self._open = False
        self._offsets = {}
        self._on_failure("abort")
        log.warning("transaction_aborted", reason=reason)
        try:
            transactional_call(self._producer.abort_transaction, bound_s=self._bound_s)
        except KafkaException as exc:
            failure = kafka_error(exc).str()
            self._on_failure("replace")
            log.error("transaction_abort_failed", reason=failure, after=reason)
            self._replace(failure)

    def _replace(self, reason: str) -> None:
        """Release the producer (its records are never committed) and start a new one."""
        self._open = False
        self._offsets = {}
        self.sink.close(timeout_s=0)
        self._producer, self.sink = self._start()
        log.warning("transactional_producer_replaced", reason=reason)

    def _abandon(self, pending: Future[None]) -> None:
        """The commit thread did not return within the bound: leave it its producer (no
        call may run on a client another thread is inside), start a new producer, whose
        initialisation fences the old one and aborts its transaction, and rewind.
        """
        self._on_failure("stalled")
        log.error("transaction_stalled", call="commit", waited_s=self._bound_s + ABANDON_GRACE_S)
        old = self.sink
        pending.add_done_callback(lambda _: old.close(timeout_s=0))  # once its call returns
        self._open = False
        self._offsets = {}
        self._producer, self.sink = self._start()
        log.warning("transactional_producer_replaced", reason="a commit did not return")
        raise Rewind("a transaction's commit did not return within the bound")


def _in_thread(call: Callable[..., None], *args: object) -> Future[None]:
    """Run `call` on a new daemon thread; its future. A thread per commit (ten a second at
    the default interval costs nothing measurable) rather than a pool: concurrent.futures
    joins its workers at interpreter exit, so a commit stuck inside librdkafka would keep
    the process from ever exiting, the stall this module exists to end.
    """
    future: Future[None] = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            call(*args)
        except BaseException as exc:  # handed to whoever awaits the commit
            future.set_exception(exc)
        else:
            future.set_result(None)

    threading.Thread(target=run, name="commit", daemon=True).start()
    return future


def _commit(
    producer: Producer, offsets: list[TopicPartition], metadata: object, bound_s: float
) -> None:
    """Add the input offsets to the producer's open transaction and commit it, both within
    `bound_s` (on the commit thread: confluent-kafka releases the GIL while it waits).
    """
    deadline = time.monotonic() + bound_s
    if offsets:
        transactional_call(producer.send_offsets_to_transaction, offsets, metadata, bound_s=bound_s)
    transactional_call(producer.commit_transaction, bound_s=max(1.0, deadline - time.monotonic()))


def open_checkpoint(
    settings: Settings,
    consumer: Consumer,
    changelog: str,
    reports: CommitReports,
    take_changes: Callable[[], Sequence[StateChange]],
    dead_letter_id: int,
    on_failure: Callable[[str], None],
) -> Checkpoint:
    """The checkpoint of `processing.guarantee`, with its producer and sink: outputs go to
    their input's partition modulo each output topic's partition count, read now;
    `take_changes` takes the state's pending changelog records; `on_failure` counts
    exactly-once's failed transactions by kind.
    """
    topics, processing = settings.topics, settings.processing

    def make_producer(transactional_id: str | None = None) -> Producer:
        config = producer_config(
            settings.kafka, transactional_id, processing.transaction_timeout_ms
        )
        if transactional_id is None:
            config |= AT_LEAST_ONCE_PRODUCER
        return Producer(config | {"error_cb": on_client_error})

    outputs = (topics.fraud_scores, topics.recommendations, topics.shadow_scores)
    partitions = {topic: len(topic_partitions(consumer, topic)) for topic in outputs}
    if processing.guarantee == "at_least_once":
        sink = Sink(make_producer(), topics, changelog, partitions, dead_letter_id)
        return AtLeastOnce(consumer, sink, settings.checkpoint.interval_ms, take_changes, reports)
    # One id per process instance: stable under static membership, fresh otherwise
    # (fencing across restarts comes from the group generation, KIP-447).
    instance = settings.consumer.instance_id or uuid.uuid4().hex[:12]
    transactional_id = f"{settings.consumer.group_id}.{topics.input}.{instance}"
    # Which transaction coordinator serves it follows from the id (an SRE, the chaos run).
    log.info("transactional_id", transactional_id=transactional_id)
    return ExactlyOnce(
        consumer,
        lambda: make_producer(transactional_id),
        # Untracked: the transaction's commit fails if any record in it failed.
        lambda producer: Sink(producer, topics, changelog, partitions, dead_letter_id, track=False),
        take_changes,
        processing.transaction_interval_ms,
        processing.transaction_call_timeout_ms / 1000,
        on_failure,
    )

"""The one place that decides when input counts as done: the two delivery guarantees.

**At least once** (`AtLeastOnce`): outputs are produced as batches finish; at each
checkpoint the producer is flushed (every output acknowledged), then the state of every user
changed since the last checkpoint is written to the changelog and flushed, then the input
offsets are committed. A crash replays input from the last commit. Because a user's
changelog record is written only after the outputs of the events folded into it were
acknowledged, and it remembers the offset of the last of those events, the replayed events
it already holds are skipped (`FeatureUpdater.fresh`) and the rest see exactly the state
they saw the first time: outputs may repeat, but never with different features.

**Exactly once** (`ExactlyOnce`): each batch is one transaction holding its outputs, the
changelog records of the users it changed, and its input offsets
(`send_offsets_to_transaction`). Errors are handled by class (REFERENCE §2): a retriable one
retries the call, an abortable one aborts and rewinds, a fatal one recreates the producer
(fencing the old one) and rewinds. Rewinding (`Rewind`) means: drop the state of every
assigned partition, restore it from the changelog's committed records, and seek the consumer
back to the committed offsets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from pipeline.features.state import FeatureStore
from pipeline.kafka.messages import position
from pipeline.logging import get_logger
from pipeline.sink import Sink

log = get_logger()
RETRY_FOR_S = 60.0  # retriable transactional errors are retried this long


class Rewind(Exception):
    """The batch in hand was rolled back: rewind state and input to the last commit."""


class Checkpoint(Protocol):
    """How a delivery guarantee brackets batches and commits progress."""

    sink: Sink  # where this batch's outputs go (exactly-once replaces it with the producer)

    def begin_batch(self) -> None:
        """Before the batch's outputs are produced."""
        ...

    def end_batch(self, messages: list[Message]) -> None:
        """After the batch's outputs are produced; may raise Rewind."""
        ...

    def due(self) -> bool:
        """Whether `commit` should run now."""
        ...

    def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Make everything processed so far (for `partitions`, or all) durable."""
        ...

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop progress of lost partitions without committing it."""
        ...

    def close(self) -> None:
        """Release the producer."""
        ...


class AtLeastOnce:
    """Flush outputs, write changed state, flush, commit offsets; every `interval_ms`."""

    def __init__(
        self, consumer: Consumer, sink: Sink, store: FeatureStore, interval_ms: int
    ) -> None:
        """Commit `consumer`'s progress after `sink` acknowledged outputs and state."""
        self._consumer = consumer
        self.sink = sink
        self._store = store
        self._interval_s = interval_ms / 1000.0
        self._pending: dict[tuple[str, int], int] = {}
        self._last = time.monotonic()

    def begin_batch(self) -> None:
        """Nothing to open."""

    def end_batch(self, messages: list[Message]) -> None:
        """Remember the next offset to commit per partition."""
        for message in messages:
            if message.error() is None:
                topic, partition, offset = position(message)
                self._pending[(topic, partition)] = offset + 1

    def due(self) -> bool:
        """Whether the interval has passed since the last checkpoint."""
        return time.monotonic() - self._last >= self._interval_s

    def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Flush outputs, then write and flush changed state, then commit offsets."""
        self._last = time.monotonic()
        selected = None if partitions is None else {(tp.topic, tp.partition) for tp in partitions}
        keys = [key for key in self._pending if selected is None or key in selected]
        self.sink.flush()
        state_partitions = None if selected is None else {p for _, p in selected}
        changes = self._store.take_changes(state_partitions)
        if changes:
            self.sink.publish_state(changes)
            self.sink.flush()
        if not keys:
            return
        offsets = [TopicPartition(t, p, self._pending[(t, p)]) for t, p in keys]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # The outputs are safe; only the progress marker failed (e.g. the broker is
            # restarting). Keep it pending: the next checkpoint commits it, or a replay
            # after a crash repeats outputs, as at-least-once allows.
            log.warning(
                "commit_failed", reason=exc.args[0].str(), retriable=exc.args[0].retriable()
            )
            if exc.args[0].fatal():
                raise
            return
        for key in keys:
            self._pending.pop(key)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop progress of lost partitions without committing it."""
        for tp in partitions:
            self._pending.pop((tp.topic, tp.partition), None)

    def close(self) -> None:
        """Flush what is left (the final commit has normally done it)."""
        self.sink.flush()


class ExactlyOnce:
    """One transaction per batch: outputs, changelog records and input offsets together."""

    def __init__(
        self,
        consumer: Consumer,
        make_producer: Callable[[], Producer],
        make_sink: Callable[[Producer], Sink],
        store: FeatureStore,
    ) -> None:
        """Create the transactional producer (fencing any older one with its id)."""
        self._consumer = consumer
        self._make_producer = make_producer
        self._make_sink = make_sink
        self._store = store
        self._open = False
        self._producer, self.sink = self._start()

    def begin_batch(self) -> None:
        """Open the batch's transaction."""
        if not self._open:
            try:
                self._call(self._producer.begin_transaction)
            except KafkaException as exc:
                self._recover(exc)
            self._open = True

    def end_batch(self, messages: list[Message]) -> None:
        """Add the changed state and the offsets, then commit the transaction."""
        offsets: dict[tuple[str, int], int] = {}
        for message in messages:
            if message.error() is None:
                topic, partition, offset = position(message)
                offsets[(topic, partition)] = offset + 1
        try:
            self.sink.publish_state(self._store.take_changes())
            if offsets:
                self._call(
                    self._producer.send_offsets_to_transaction,
                    [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    self._consumer.consumer_group_metadata(),
                )
            self._call(self._producer.commit_transaction)
            self._open = False
            self.sink.raise_failures()
        except KafkaException as exc:
            self._recover(exc)

    def due(self) -> bool:
        """Every batch commits itself."""
        return False

    def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Nothing is pending between batches: each batch's transaction committed it."""

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Nothing is pending between batches."""

    def close(self) -> None:
        """Abort a transaction left open and flush."""
        if self._open:
            self._producer.abort_transaction()
            self._open = False
        self._producer.flush(10)

    def _start(self) -> tuple[Producer, Sink]:
        producer = self._make_producer()
        self._call(producer.init_transactions)
        return producer, self._make_sink(producer)

    def _recover(self, exc: KafkaException) -> None:
        error = exc.args[0]
        if error.txn_requires_abort():
            log.warning("transaction_aborted", reason=error.str())
            self._producer.abort_transaction()
        else:
            log.error("transaction_fatal", reason=error.str())
            self._producer, self.sink = self._start()
        self._open = False
        raise Rewind(error.str()) from exc

    @staticmethod
    def _call(call: Callable[..., object], *args: object) -> None:
        """Run a transactional call, retrying it while the error says it is retriable."""
        deadline = time.monotonic() + RETRY_FOR_S
        delay = 0.1
        while True:
            try:
                call(*args)
                return
            except KafkaException as exc:
                if not exc.args[0].retriable() or time.monotonic() > deadline:
                    raise
                log.warning(
                    "transaction_call_retried", call=call.__name__, reason=exc.args[0].str()
                )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

"""The one place that decides commit order: flush outputs, then commit input offsets.

Offsets are committed only for messages whose outputs were all acknowledged, so a crash
between checkpoints replays input (at-least-once) and never loses it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from confluent_kafka import Consumer, Message, TopicPartition

from pipeline.kafka.messages import position
from pipeline.sink import Sink


class Checkpoint:
    """Tracks the next offset to commit per partition and commits on schedule or revoke."""

    def __init__(self, consumer: Consumer, sink: Sink, interval_ms: int) -> None:
        """Commit `consumer`'s progress after flushing `sink`, every `interval_ms`."""
        self._consumer = consumer
        self._sink = sink
        self._interval_s = interval_ms / 1000.0
        self._pending: dict[tuple[str, int], int] = {}
        self._last = time.monotonic()

    def track(self, message: Message) -> None:
        """`message` has been processed and its outputs queued."""
        topic, partition, offset = position(message)
        self._pending[(topic, partition)] = offset + 1

    def due(self) -> bool:
        """Whether the interval has passed since the last checkpoint."""
        return time.monotonic() - self._last >= self._interval_s

    def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Flush outputs, then synchronously commit the offsets of `partitions` (all if None)."""
        self._last = time.monotonic()
        keys = (
            list(self._pending)
            if partitions is None
            else [
                (tp.topic, tp.partition)
                for tp in partitions
                if (tp.topic, tp.partition) in self._pending
            ]
        )
        if not keys:
            return
        self._sink.flush()
        offsets = [TopicPartition(topic, p, self._pending.pop((topic, p))) for topic, p in keys]
        self._consumer.commit(offsets=offsets, asynchronous=False)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop progress of lost partitions without committing it."""
        for tp in partitions:
            self._pending.pop((tp.topic, tp.partition), None)

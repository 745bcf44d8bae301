"""Consume: the group member's consumer, and what decides whether it fetches.

`open_consumer` builds it from `consumer_config` (cooperative-sticky assignment, manual
commits, read_committed) with the callbacks that report commits, client errors and
librdkafka's statistics. `Backpressure` pauses fetching while too many outputs await
acknowledgement or while the input is held for an unavailable dependency, and
`RegistryHold` times the retries of that hold. The loop that drives them is `runner.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from pipeline.kafka.clients import consumer_config
from pipeline.logging import get_logger
from pipeline.settings import Settings

log = get_logger()


def open_consumer(settings: Settings, on_stats: Callable[[str], None]) -> Consumer:
    """The pipeline's consumer, not yet subscribed; librdkafka's statistics go to `on_stats`
    every `telemetry.statistics_interval_ms`.
    """
    return Consumer(
        consumer_config(settings)
        | {
            "error_cb": on_client_error,
            "on_commit": on_commit,
            "stats_cb": on_stats,
            "statistics.interval.ms": settings.telemetry.statistics_interval_ms,
        }
    )


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


def on_commit(error: KafkaError | None, partitions: list[TopicPartition]) -> None:
    """Result of an asynchronous offset commit: a failure is only logged, since every later
    commit carries each owned partition's safe offset again.
    """
    if error is not None and error.code() == KafkaError._NO_OFFSET:
        return  # nothing to commit is not a failure
    failed = [tp.partition for tp in partitions if tp.error is not None]
    if error is not None or failed:
        log.warning(
            "commit_failed",
            reason=error.str() if error is not None else "partition errors",
            partitions=failed,
        )


def on_client_error(error: KafkaError) -> None:
    log.warning("kafka_client_error", code=error.name(), reason=error.str(), fatal=error.fatal())

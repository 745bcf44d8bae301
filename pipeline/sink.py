"""Encodes results and dead letters and produces them; delivery failures are collected so the
checkpoint never commits input whose outputs were not acknowledged.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

import schemas
from pipeline.codec import DecodeError, Encoder
from pipeline.scoring import Scored
from pipeline.settings import TopicSettings


class DeliveryError(RuntimeError):
    """Outputs were not acknowledged; the inputs behind them must not be committed."""


def dead_letter(message: Message, error: DecodeError) -> dict[str, Any]:
    """The DeadLetter record for an input `message` that failed with `error`."""
    return {
        "original_key": message.key(),
        "original_value": message.value(),
        "source_topic": message.topic(),
        "source_partition": message.partition(),
        "source_offset": message.offset(),
        "error_kind": error.kind,
        "error_message": error.message,
        "failed_time": int(time.time() * 1000),
    }


class Sink:
    """Produces FraudScore, Recommendation and DeadLetter records, keyed by user id."""

    def __init__(self, producer: Producer, topics: TopicSettings) -> None:
        """Write to the topics named in `topics` through `producer`."""
        self._producer = producer
        self._topics = topics
        self._fraud = Encoder(schemas.FRAUD_SCORE)
        self._recommendation = Encoder(schemas.RECOMMENDATION)
        self._dead_letter = Encoder(schemas.DEAD_LETTER)
        self._failures: list[str] = []

    def publish(self, scored: Scored, dead_letters: list[dict[str, Any]]) -> None:
        """Queue every output of a batch; deliveries are confirmed at the next flush."""
        for record in scored.fraud_scores:
            self._produce(self._topics.fraud_scores, record["user_id"], self._fraud.encode(record))
        for record in scored.recommendations:
            self._produce(
                self._topics.recommendations, record["user_id"], self._recommendation.encode(record)
            )
        for record in dead_letters:
            key = record["original_key"]
            self._produce(self._topics.dead_letter, key, self._dead_letter.encode(record))
        self._producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued output is acknowledged; raise DeliveryError otherwise."""
        remaining = self._producer.flush(timeout_s)
        if self._failures:
            failures, self._failures = self._failures, []
            raise DeliveryError(f"{len(failures)} outputs failed delivery, first: {failures[0]}")
        if remaining:
            raise DeliveryError(f"{remaining} outputs still unacknowledged after {timeout_s}s")

    def _produce(self, topic: str, key: str | bytes | None, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                return
            except BufferError:  # local queue full: serve delivery reports, then retry
                self._producer.poll(0.05)

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append(f"{message.topic()}: {error}")

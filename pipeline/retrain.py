"""`streamscore retrain`: a fraud challenger trained on recent labelled traffic.

It reads the input topic and the labels topic from `window_s` ago (by Kafka timestamp,
`offsets_for_times`) to their ends, keeps the events that have a label, and trains on them
in event-time order with the same features the pipeline computes
(`engines.train.retrain_fraud`). The new version is saved in the challenger role: the
pipeline shadow-scores it and the monitor compares it with the champion; it serves only
once promoted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

import schemas
from pipeline.codec import DecodeError, Decoder
from pipeline.events import ClickEvent
from pipeline.kafka.admin import topic_partitions
from pipeline.kafka.clients import reading_catalog
from pipeline.settings import Settings


@dataclass(frozen=True, slots=True)
class Labelled:
    """Recent events with their labels, in event-time order."""

    events: list[ClickEvent]
    labels: np.ndarray  # bool, one per event
    since_ms: int
    unlabelled: int  # events in the window without a label (yet)
    unreadable: int

    def describe(self) -> dict[str, Any]:
        """What a challenger was trained on, for its manifest."""
        return {
            "since_ms": self.since_ms,
            "events": len(self.events),
            "positives": int(self.labels.sum()),
            "unlabelled": self.unlabelled,
        }


def labelled_events(settings: Settings, window_s: float, timeout_s: float = 300) -> Labelled:
    """The input's events since `window_s` ago that have a label on the labels topic."""
    since_ms = int((time.time() - window_s) * 1000)
    topics = settings.topics
    catalog = reading_catalog(settings)
    labels: dict[str, bool] = {}
    unreadable = 0
    label_decoder = Decoder(schemas.FRAUD_LABEL, catalog)
    for value in _read_since(settings, topics.labels, since_ms, timeout_s):
        try:
            record = label_decoder.decode(value)
        except DecodeError:
            unreadable += 1
            continue
        labels[record["event_id"]] = record["is_fraud"]
    events: list[ClickEvent] = []
    unlabelled = 0
    event_decoder = Decoder(schemas.CLICK_EVENT, catalog)
    for value in _read_since(settings, topics.input, since_ms, timeout_s):
        try:
            record = event_decoder.decode(value)
        except DecodeError:
            unreadable += 1  # the pipeline dead-lettered it: not training data
            continue
        if record["event_id"] in labels:
            events.append(ClickEvent(**record))
        else:
            unlabelled += 1
    events.sort(key=lambda event: event.event_time)
    truth = np.array([labels[event.event_id] for event in events], dtype=bool)
    return Labelled(events, truth, since_ms, unlabelled, unreadable)


def _read_since(settings: Settings, topic: str, since_ms: int, timeout_s: float) -> list[bytes]:
    """Every committed value of `topic` from the first offset at or after `since_ms`."""
    consumer = Consumer(
        settings.kafka.client_config()
        | {
            "group.id": f"{settings.monitor.group_id}.retrain",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = topic_partitions(consumer, topic)
        starts = consumer.offsets_for_times(
            [TopicPartition(topic, p, since_ms) for p in partitions], timeout=30
        )
        # A partition with nothing at or after since_ms answers -1 (its end): nothing to read.
        wanted = [tp for tp in starts if tp.offset >= 0]
        consumer.assign(wanted)
        pending = {tp.partition for tp in wanted}
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: partitions {sorted(pending)} not read to the end")
            for message in consumer.consume(10_000, 0.5):
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(error)
                    pending.discard(message.partition() or 0)
                    continue
                value = message.value()
                if value is not None:
                    values.append(value)
        return values
    finally:
        consumer.close()

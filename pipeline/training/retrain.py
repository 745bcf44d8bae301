"""`streamscore retrain`: a fraud challenger trained on recent labelled traffic.

It reads the input topic and the labels topic from `window_s` ago (by Kafka timestamp) to
their ends, keeps the events that have a label, and trains on them in event-time order with
the same features the pipeline computes (`pipeline.training.train.retrain_fraud`). The new
version is saved in the challenger role: it serves only once promoted (`streamscore
promote`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import schemas
from pipeline.kafka.clients import reading_catalog
from pipeline.kafka.messages import read_messages
from pipeline.serve.events import ClickEvent
from pipeline.settings import Settings
from schemas.codec import DecodeError, Decoder


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
    catalog = reading_catalog(settings.schema_registry)
    labels: dict[str, bool] = {}
    unreadable = 0
    label_decoder = Decoder(schemas.FRAUD_LABEL, catalog)
    for message in read_messages(settings.kafka, topics.labels, timeout_s, since_ms):
        try:
            record = label_decoder.decode(message.value())
        except DecodeError:
            unreadable += 1
            continue
        labels[record["event_id"]] = record["is_fraud"]
    events: list[ClickEvent] = []
    unlabelled = 0
    event_decoder = Decoder(schemas.CLICK_EVENT, catalog)
    for message in read_messages(settings.kafka, topics.input, timeout_s, since_ms):
        try:
            record = event_decoder.decode(message.value())
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

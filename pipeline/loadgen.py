"""Writes generated clickstream to the input topic and its labels to the labels topic."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Producer

import schemas
from pipeline.codec import Encoder
from pipeline.generator import ClickstreamGenerator, GeneratorConfig
from pipeline.kafka.clients import producer_config
from pipeline.settings import Settings

# Bytes a broken producer might send: not Avro, a wrong magic byte, a cut-off record.
MALFORMED = (b"not avro at all", b"\x07\x00\x00\x00\x01garbage", b"\x00\x00\x00\x00\x01\x02")


@dataclass(frozen=True, slots=True)
class ProduceReport:
    """What `produce` wrote."""

    events: int
    with_candidates: int
    malformed: int
    seconds: float


def produce_clickstream(
    settings: Settings,
    config: GeneratorConfig,
    rate: float | None = None,
    malformed_every: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> ProduceReport:
    """Produce `config.events` events at up to `rate` per second (None: as fast as possible).

    With `malformed_every` = N > 0, a malformed message follows every N-th event.
    """
    producer = Producer(producer_config(settings))
    events, labels = Encoder(schemas.CLICK_EVENT), Encoder(schemas.FRAUD_LABEL)
    topics = settings.topics
    started = time.monotonic()
    with_candidates = malformed = count = 0
    for count, (event, label) in enumerate(ClickstreamGenerator(config), start=1):
        if rate is not None:
            ahead = count / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        key = event["user_id"].encode()
        produce_one(producer, topics.input, key, events.encode(event))
        produce_one(producer, topics.labels, event["event_id"].encode(), labels.encode(label))
        with_candidates += bool(event["candidates"])
        if malformed_every and count % malformed_every == 0:
            produce_one(producer, topics.input, key, MALFORMED[malformed % len(MALFORMED)])
            malformed += 1
        if on_progress is not None and count % 1000 == 0:
            on_progress(1000)
    remaining = producer.flush(60)
    if remaining:
        raise RuntimeError(f"{remaining} generated events were not acknowledged")
    return ProduceReport(count, with_candidates, malformed, time.monotonic() - started)


def produce_one(
    producer: Producer, topic: str, key: bytes | None, value: bytes | None, timestamp: int = 0
) -> None:
    """Queue one message, serving delivery reports while the local queue is full."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, timestamp=timestamp)
            return
        except BufferError:
            producer.poll(0.05)

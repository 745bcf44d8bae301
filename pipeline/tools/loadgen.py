"""Writes generated clickstream to the input topic and its labels to the labels topic."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Producer

import schemas
from pipeline.kafka.clients import connect_catalog, producer_config
from pipeline.settings import ProduceSettings, Settings
from pipeline.topics import producer_outputs
from pipeline.training.generator import ClickstreamGenerator, GeneratorConfig
from schemas.codec import Encoder

# Bytes a broken producer might send: not Avro, a wrong magic byte, a cut-off record.
MALFORMED = (b"not avro at all", b"\x07\x00\x00\x00\x01garbage", b"\x00\x00\x00\x00\x01\x02")


@dataclass(frozen=True, slots=True)
class ProduceReport:
    """What `produce` wrote."""

    events: int
    with_candidates: int
    malformed: int
    seconds: float


class LiveClock:
    """Event times of a live stream: the wall clock less a delivery delay, now and then hours
    less (see `ProduceSettings`). Never ahead of the wall clock. Deterministic for a seed.
    """

    def __init__(self, settings: ProduceSettings, seed: int) -> None:
        """Stamp as `settings` says, drawing from a generator seeded with `seed`."""
        self._settings = settings
        self._rng = random.Random(seed)

    def stamp(self, now_ms: int) -> int:
        """An event time for an event produced at `now_ms`."""
        settings, rng = self._settings, self._rng
        if rng.random() < settings.late_fraction:
            return now_ms - int(rng.uniform(settings.late_min_s, settings.late_max_s) * 1000)
        if settings.delay_mean_ms <= 0:
            return now_ms
        return now_ms - int(rng.expovariate(1.0 / settings.delay_mean_ms))


def produce_clickstream(
    settings: Settings,
    config: GeneratorConfig,
    rate: float | None = None,
    malformed_every: int = 0,
    on_progress: Callable[[int], None] | None = None,
    live: bool = False,
) -> ProduceReport:
    """Produce `config.events` events at up to `rate` per second (None: as fast as possible).

    Without `live`, events keep the generator's times, which end before now: a backlog, or a
    replay of the generated day at `rate` (the demo). With `live`, each event is stamped from
    the wall clock as it is produced, by a `LiveClock`, as a shop's live stream is.
    With `malformed_every` = N > 0, a malformed message follows every N-th event.
    """
    producer = Producer(producer_config(settings.kafka))
    # As a producer with a registry serializer: the schemas are registered under the input's
    # and the labels' subjects, and the ids the registry gives frame the records.
    catalog = connect_catalog(settings.schema_registry, producer_outputs(settings))
    events = Encoder(schemas.CLICK_EVENT, catalog.output_id(schemas.CLICK_EVENT))
    labels = Encoder(schemas.FRAUD_LABEL, catalog.output_id(schemas.FRAUD_LABEL))
    topics = settings.topics
    clock = LiveClock(settings.produce, config.seed) if live else None
    started = time.monotonic()
    with_candidates = malformed = count = 0
    for count, (event, label) in enumerate(ClickstreamGenerator(config), start=1):
        if rate is not None:
            ahead = count / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        if clock is not None:
            event["event_time"] = clock.stamp(int(time.time() * 1000))
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
            # By position (topic, value, key, partition, callback, on_delivery, timestamp;
            # -1: the partitioner's choice): keywords cost the call about 0.6 µs here
            # (1,660-1,800 against 1,100 ns, measured), which the bench's ceiling pays.
            producer.produce(topic, value, key, -1, None, None, timestamp)
            return
        except BufferError:
            producer.poll(0.05)

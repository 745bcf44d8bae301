"""The two comparison jobs that need no framework, run as
`python -m pipeline.tools.bench.baselines`.

- `ceiling`: consume → produce the same bytes with confluent-kafka, no decode and no work;
  outputs keep the input's timestamp so the probe can time them. What Kafka and the client
  allow on this machine; no scoring pipeline can beat it.
- `naive`: one event at a time, as a first version would be written: poll → fastavro decode
  → features → torch eager fraud score → encode → produce → synchronous commit.

Both read their settings (topics, group) from the STREAMSCORE_* environment like
`streamscore run`, and stop on SIGTERM.
"""

from __future__ import annotations

import io
import signal
import sys
import threading
import time
from typing import Any

import torch
from confluent_kafka import Consumer, Producer, TopicPartition
from fastavro import schemaless_reader, schemaless_writer

import schemas
from engines.registry import resolve
from engines.torch import build_module
from pipeline.kafka.clients import consumer_config, producer_config
from pipeline.kafka.messages import position
from pipeline.serve.consume import take_batch
from pipeline.serve.events import ClickEvent
from pipeline.serve.features import FeatureUpdater
from pipeline.serve.state import FeatureStore, Pseudonyms
from pipeline.settings import Settings, load_settings
from pipeline.tools.loadgen import produce_one

_HEADER = 5  # magic byte and schema id


def ceiling(settings: Settings, stop: threading.Event) -> None:
    """Mirror the input topic's bytes to the fraud-scores topic, committing once a second
    after a flush (at least once).
    """
    consumer = Consumer(consumer_config(settings.kafka, settings.consumer))
    producer = Producer(producer_config(settings.kafka))
    consumer.subscribe([settings.topics.input])
    out = settings.topics.fraud_scores
    # The next offset to commit per partition, once the outputs before it are flushed. The
    # consumer stores no offsets itself (consumer_config), so a bare commit() would have
    # nothing to commit and, synchronous, raise _NO_OFFSET.
    mirrored: dict[tuple[str, int], int] = {}
    next_commit = time.monotonic() + 1.0
    wait_s = settings.consumer.max_wait_ms / 1000.0
    try:
        while not stop.is_set():
            # Batches are taken as streamscore takes them.
            for message in take_batch(consumer, settings.consumer.max_batch, wait_s):
                if message.error() is None:
                    produce_one(
                        producer, out, message.key(), message.value(), message.timestamp()[1]
                    )
                    topic, partition, offset = position(message)
                    mirrored[topic, partition] = offset + 1
            producer.poll(0)
            if time.monotonic() >= next_commit:
                if offsets := flushed_offsets(producer, mirrored):
                    consumer.commit(offsets=offsets, asynchronous=True)
                next_commit = time.monotonic() + 1.0
        if offsets := flushed_offsets(producer, mirrored):
            consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


def flushed_offsets(
    producer: Producer, mirrored: dict[tuple[str, int], int]
) -> list[TopicPartition]:
    """At least once: flush the outputs, then hand over (and forget) the offsets after them
    to commit; none when nothing was mirrored since the last call.
    """
    producer.flush()
    offsets = [TopicPartition(t, p, offset) for (t, p), offset in mirrored.items()]
    mirrored.clear()
    return offsets


def naive(settings: Settings, stop: threading.Event) -> None:
    """One event at a time, the same features and fraud model as streamscore (torch eager)."""
    torch.set_num_threads(1)
    artifact = resolve(
        settings.engine.model_dir, settings.engine.fraud_model, settings.engine.fraud_version
    )
    model = build_module(artifact)
    reader = schemas.load(schemas.CLICK_EVENT).parsed
    writer = schemas.load(schemas.FRAUD_SCORE)
    header = bytes([0]) + writer.schema_id.to_bytes(4, "big")
    features = settings.features
    updater = FeatureUpdater(
        FeatureStore(features.history_length),
        Pseudonyms.ephemeral(),
        features.session_gap_s,
        features.allowed_lateness_s,
    )
    consumer = Consumer(consumer_config(settings.kafka, settings.consumer))
    producer = Producer(producer_config(settings.kafka))
    consumer.subscribe([settings.topics.input])
    try:
        while not stop.is_set():
            message = consumer.poll(0.1)
            if message is None or message.error() is not None:
                continue
            body = io.BytesIO(message.value() or b"")
            body.seek(_HEADER)
            record: dict[str, Any] = schemaless_reader(body, reader, None)  # type: ignore[assignment]
            _, partition, offset = position(message)
            event = ClickEvent(
                **record, partition=partition, offset=offset, ingest_time=message.timestamp()[1]
            )
            batch = updater.process([event])
            with torch.inference_mode():
                score, _ = model(
                    torch.from_numpy(batch.numeric), torch.from_numpy(batch.categorical)
                )
            out = io.BytesIO()
            out.write(header)
            schemaless_writer(
                out,
                writer.parsed,
                {
                    "event_id": event.event_id,
                    "user_id": event.user_id,
                    "event_time": event.event_time,
                    "score": float(score[0]),
                    "decision": "allow",
                    "reasons": [],
                    "model_name": artifact.name,
                    "model_version": artifact.version,
                    "ingest_time": event.ingest_time,
                    "scored_time": int(time.time() * 1000),
                },
            )
            produce_one(producer, settings.topics.fraud_scores, message.key(), out.getvalue())
            producer.poll(0)
            consumer.commit(message=message, asynchronous=False)
        producer.flush()
    finally:
        consumer.close()


def main() -> None:
    """`python -m pipeline.tools.bench.baselines ceiling|naive`."""
    jobs = {"ceiling": ceiling, "naive": naive}
    if len(sys.argv) != 2 or sys.argv[1] not in jobs:
        sys.exit(f"usage: python -m pipeline.tools.bench.baselines {{{'|'.join(jobs)}}}")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    jobs[sys.argv[1]](load_settings(), stop)


if __name__ == "__main__":
    main()

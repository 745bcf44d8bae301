"""The pipeline's lifecycle: consume a micro-batch → decode → features → score → produce,
checkpoint on schedule, and stop cleanly when asked.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

import schemas
from engines.base import Engine, EngineError
from engines.factory import load_engine
from engines.reload import ModelWatcher
from pipeline.checkpoint import Checkpoint
from pipeline.codec import DecodeError, Decoder
from pipeline.events import ClickEvent, validate
from pipeline.features import FeatureStore, FeatureUpdater
from pipeline.kafka.clients import consumer_config, producer_config
from pipeline.kafka.messages import position
from pipeline.logging import get_logger
from pipeline.scoring import Scorer
from pipeline.settings import Settings
from pipeline.sink import Sink, dead_letter

log = get_logger()


@dataclass(slots=True)
class RunStats:
    """Counts and busy time of one run; written to `--stats-file` on exit."""

    consumed: int = 0
    scored: int = 0
    recommendations: int = 0
    dead_lettered: int = 0
    batches: int = 0
    busy_s: float = 0.0


class Pipeline:
    """One consumer-group member and everything it owns."""

    def __init__(self, settings: Settings, fraud: Engine, ranking: Engine) -> None:
        """Wire the stages; Kafka clients are created by `run`."""
        self.settings = settings
        self.stats = RunStats()
        self._decoder = Decoder(schemas.CLICK_EVENT)
        self._store = FeatureStore(settings.features.history_length)
        self._updater = FeatureUpdater(self._store, settings.features.session_gap_s)
        self._scorer = Scorer(fraud, ranking, settings.decision, settings.ranking)
        self._watcher = ModelWatcher(
            settings.engine, {"fraud": fraud.version, "ranking": ranking.version}
        )

    def run(self, stop: threading.Event) -> RunStats:
        """Consume until `stop` is set; finish the batch in hand, flush, commit, close."""
        with ExitStack() as stack:
            consumer = Consumer(consumer_config(self.settings) | {"error_cb": _on_client_error})
            stack.callback(consumer.close)
            producer = Producer(producer_config(self.settings) | {"error_cb": _on_client_error})
            sink = Sink(producer, self.settings.topics)
            checkpoint = Checkpoint(consumer, sink, self.settings.checkpoint.interval_ms)
            self._subscribe(consumer, checkpoint)
            batch_size = self.settings.consumer.max_batch
            wait_s = self.settings.consumer.max_wait_ms / 1000.0
            while not stop.is_set():
                messages = consumer.consume(batch_size, wait_s)
                if messages:
                    self._process(messages, sink, checkpoint)
                self._swap_reloaded_models()
                if checkpoint.due():
                    checkpoint.commit()
            checkpoint.commit()
            log.info("pipeline_stopped", **asdict(self.stats))
        return self.stats

    def close(self) -> None:
        """Stop watching for models and close the engines in use."""
        self._watcher.close()
        self._scorer.fraud.close()
        self._scorer.ranking.close()

    def _swap_reloaded_models(self) -> None:
        """Between batches, serve any newer model version the watcher has loaded."""
        for role, engine in self._watcher.poll():
            try:
                old = self._scorer.swap(role, engine)
            except EngineError as exc:
                log.warning(
                    "model_reload_rejected", role=role, version=engine.version, error=str(exc)
                )
                self._watcher.refuse(role, engine.version)
                engine.close()
                continue
            self._watcher.swapped(role, engine.version)
            log.info(
                "model_swapped",
                role=role,
                model=engine.name,
                old_version=old.version,
                new_version=engine.version,
                backend=engine.backend,
            )
            old.close()

    def _subscribe(self, consumer: Consumer, checkpoint: Checkpoint) -> None:
        def on_assign(_: Consumer, partitions: list[TopicPartition]) -> None:
            log.info("partitions_assigned", partitions=[tp.partition for tp in partitions])

        def on_revoke(_: Consumer, partitions: list[TopicPartition]) -> None:
            log.info("partitions_revoked", partitions=[tp.partition for tp in partitions])
            try:
                checkpoint.commit(partitions)
            finally:
                for tp in partitions:
                    self._store.drop_partition(tp.partition)

        def on_lost(_: Consumer, partitions: list[TopicPartition]) -> None:
            log.warning("partitions_lost", partitions=[tp.partition for tp in partitions])
            checkpoint.forget(partitions)
            for tp in partitions:
                self._store.drop_partition(tp.partition)

        consumer.subscribe(
            [self.settings.topics.input], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost
        )

    def _process(self, messages: list[Message], sink: Sink, checkpoint: Checkpoint) -> None:
        started = time.perf_counter()
        events, dead = self._decode(messages)
        features = self._updater.process(events)
        scored = self._scorer.score(events, features)
        sink.publish(scored, dead)
        for message in messages:
            if message.error() is None:
                checkpoint.track(message)
        stats = self.stats
        stats.batches += 1
        stats.scored += len(scored.fraud_scores)
        stats.recommendations += len(scored.recommendations)
        stats.dead_lettered += len(dead)
        stats.busy_s += time.perf_counter() - started

    def _decode(self, messages: list[Message]) -> tuple[list[ClickEvent], list[dict[str, Any]]]:
        limits = self.settings.limits
        now_ms = int(time.time() * 1000)
        events: list[ClickEvent] = []
        dead: list[dict[str, Any]] = []
        for message in messages:
            error = message.error()
            if error is not None:
                _raise_if_fatal(error, message)
                continue
            self.stats.consumed += 1
            value = message.value()
            try:
                if value is not None and len(value) > limits.max_payload_bytes:
                    raise DecodeError(
                        "decode.payload_too_large",
                        f"{len(value)} bytes, limit {limits.max_payload_bytes}",
                    )
                record = self._decoder.decode(value)
                validate(record, message.key(), limits, now_ms)
            except DecodeError as exc:
                dead.append(dead_letter(message, exc))
                continue
            _, partition, offset = position(message)
            events.append(
                ClickEvent(
                    **record, partition=partition, offset=offset, ingest_time=message.timestamp()[1]
                )
            )
        return events, dead


def _raise_if_fatal(error: KafkaError, message: Message) -> None:
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


def _on_client_error(error: KafkaError) -> None:
    log.warning("kafka_client_error", code=error.name(), reason=error.str(), fatal=error.fatal())


def run_pipeline(
    settings: Settings, stop: threading.Event, stats_file: Path | None = None
) -> RunStats:
    """Load the engines, run until `stop`, close everything, optionally write stats."""
    fraud_pin, ranking_pin = settings.engine.pins()
    fraud = load_engine(fraud_pin, settings.engine)
    ranking = load_engine(ranking_pin, settings.engine)
    try:
        pipeline = Pipeline(settings, fraud, ranking)
    except BaseException:
        fraud.close()
        ranking.close()
        raise
    try:
        stats = pipeline.run(stop)
    finally:
        pipeline.close()
    if stats_file is not None:
        stats_file.parent.mkdir(parents=True, exist_ok=True)
        stats_file.write_text(json.dumps(asdict(stats)))
    return stats

"""The pipeline's lifecycle: consume a micro-batch → decode → skip replays → features →
score → produce → commit (per the delivery guarantee), restoring state from the changelog
on assignment, and stop cleanly when asked.

Batches overlap in two steps. `prepare` decodes a batch, computes its features and starts
its inference on the inference thread; `finish` waits for that inference, produces the
outputs and hands the batch to the checkpoint. Prepared batches wait in `batches`
(`inflight.InFlight`, a FIFO with the rules for how many may wait): with
`processing.inference_depth` 1 or more (1 is the default) the engines score batch N while
the loop prepares batch N+1; with 0 each batch is finished as soon as it is prepared.
Batches are finished, produced and committed strictly in order. State moves only in
`prepare` (on this one thread). The batch that closes a stretch or transaction
(`Checkpoint.closing`, asked there) carries the changelog records of the state it left,
for every user changed since the last such batch, so the checkpoint never sees a later
batch's state early; with no batch in flight the checkpoint takes them itself.
Rebalances, model swaps and the stop finish the batches in flight first.

Beside the loop: `inflight.InFlight` (the batches in flight), `consume.Partitions`
(rebalances and each partition's state), `counts.count_batch` (run counts and metrics) and
`produce.debug_headers`.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import (
    Consumer,
    Message,
    TopicPartition,
)

import schemas
from engines.base import Engine
from engines.drift import Profile
from engines.factory import load_engine
from engines.reload import ModelWatcher
from pipeline.kafka.clients import connect_catalog
from pipeline.logging import get_logger
from pipeline.serve.commit import (
    Checkpoint,
    CommitReports,
    Offsets,
    Rewind,
    open_checkpoint,
)
from pipeline.serve.consume import (
    Backpressure,
    Partitions,
    RegistryHold,
    open_consumer,
    raise_if_fatal,
    take_batch,
)
from pipeline.serve.counts import RunStats, count_batch
from pipeline.serve.decode import OK, BatchDecoder
from pipeline.serve.encode import OutputEncoder
from pipeline.serve.features.fold import Featurizer
from pipeline.serve.forget import Forgetter, ensure_forget_topic
from pipeline.serve.histograms import InputHistograms
from pipeline.serve.inflight import InFlight
from pipeline.serve.produce import dead_letter, debug_headers
from pipeline.serve.records import DeadLetter, EventColumns, FeatureBatch, Scored
from pipeline.serve.score import Inference, InferenceThread, Request, Scorer
from pipeline.serve.score import warm_kernels as warm_scoring
from pipeline.serve.state.changelog import ensure_changelog
from pipeline.serve.state.changes import StateChange
from pipeline.serve.state.pseudonym import Pseudonyms
from pipeline.serve.state.table import UserTable
from pipeline.serve.swap import ModelSwaps
from pipeline.settings import LimitSettings, Settings
from pipeline.telemetry import Telemetry
from pipeline.topics import create_topics, pipeline_outputs
from schemas.catalog import Catalog, RegistryUnavailable
from schemas.codec import Encoder

log = get_logger()


@dataclass(slots=True)
class _Batch:
    """A batch between its features and its outputs: its inference may still be running."""

    messages: list[Message]
    columns: EventColumns  # the consumed messages without errors, decoded
    rows: np.ndarray  # the rows scored: valid, minus replays already in the state
    replayed: int
    dead: list[DeadLetter]
    features: FeatureBatch
    # A batch closing a stretch (or transaction): the changelog records of every user
    # changed since the last one, as this batch left them. None: they stay in the state.
    changes: Sequence[StateChange] | None
    late: int
    request: Request
    inference: Future[Inference]
    started_ms: float  # wall clock when preparing began (timing header)
    decode_s: float
    features_s: float
    prepare_s: float  # building the engine inputs and starting inference
    cpu_s: tuple[float, float, float]  # the loop thread's CPU in those three


class Pipeline:
    """One consumer-group member and everything it owns."""

    def __init__(
        self, settings: Settings, fraud: Engine, ranking: Engine, catalog: Catalog
    ) -> None:
        """Wire the stages; Kafka clients are created by `run`. `catalog` frames the outputs
        and resolves input writer ids (`kafka.clients.connect_catalog`).
        """
        self.settings = settings
        self.stats = RunStats()
        features = settings.features
        self._decoder = BatchDecoder(settings.limits, catalog)
        self._dead_letter_id = catalog.output_id(schemas.DEAD_LETTER)
        registry = settings.schema_registry
        self._gate = Backpressure(settings.processing.max_in_flight)
        self._registry_hold = RegistryHold(registry.retry_backoff_s, registry.retry_backoff_max_s)
        # Room for max_users and one batch of new ones before eviction (up to 2M slots are
        # reserved at once: untouched slots take no memory; past that the table doubles).
        capacity = min(features.max_users, 2**21) + settings.consumer.max_batch + 1
        self.store = UserTable(
            features.history_length, features.max_users, features.ttl_s, capacity
        )
        pseudonyms = self._pseudonyms = Pseudonyms(settings.privacy.secret())
        self._redact = pseudonyms if settings.privacy.dead_letter_payload == "redact" else None
        self._updater = Featurizer(
            self.store,
            pseudonyms,
            features.session_gap_s,
            features.allowed_lateness_s,
        )
        self._encoder = OutputEncoder(catalog)
        self._histograms = InputHistograms(
            settings.monitor.histogram_interval_s, catalog.output_id(schemas.INPUT_HISTOGRAM)
        )
        self._scorer = Scorer(fraud, ranking, settings.decision, settings.ranking)
        self.telemetry = Telemetry(settings.telemetry.liveness_timeout_s)
        self.models = ModelSwaps(
            self._scorer,
            ModelWatcher(settings.engine, {"fraud": fraud.version, "ranking": ranking.version}),
            self.telemetry,
        )
        for role, engine in (("fraud", fraud), ("ranking", ranking)):
            self.models.describe(role, engine)
        self.telemetry.engines_loaded()
        self._next_state_sample = 0.0
        self.inference = InferenceThread(settings.processing.inference_depth)
        log.info("inference_depth", depth=self.inference.depth)
        # prepared, not yet finished; oldest first
        self.batches = InFlight(self.prepare, self.finish, self.inference.depth)
        self._partitions = Partitions(settings, self.store, self.telemetry, self.stats)
        # Erasures applied since the last batch was prepared: that batch's stretch takes
        # their tombstones when it closes; with none in flight, a stretch closes for them.
        self._unsent_erasures = False

    def run(self, stop: threading.Event) -> RunStats:
        """Consume until `stop` is set; finish the batch in hand, commit, close."""
        changelog = ensure_changelog(self.settings)
        ensure_forget_topic(self.settings)
        topics = self.settings.topics
        create_topics(self.settings, [topics.input_histograms, topics.shadow_scores])  # if missing
        telemetry = self.telemetry
        with ExitStack() as stack:
            if self.settings.telemetry.port:
                telemetry.serve(self.settings.telemetry.host, self.settings.telemetry.port)
                stack.callback(telemetry.close)
            telemetry.watch_gc()
            stack.callback(telemetry.unwatch_gc)
            # Everything alive now (modules, engines, settings) lives as long as the process:
            # out of the collector's sight, a full collection no longer walks it while events
            # wait (a few hundred thousand objects, 50-130 ms per pause when measured).
            gc.collect()
            gc.freeze()
            # Closed after the consumer: closing it may still run a rebalance callback,
            # which applies erasures to the partitions it assigns.
            forgetter = self._partitions.forgetter = Forgetter(
                self.settings, self.store, self._pseudonyms, telemetry.forgotten.inc
            )
            stack.callback(forgetter.close)
            reports = CommitReports()
            consumer = open_consumer(self.settings, telemetry.on_stats, reports)
            stack.callback(consumer.close)
            checkpoint = open_checkpoint(
                self.settings,
                consumer,
                changelog,
                reports,
                self.store.take_changes,
                self._dead_letter_id,
                lambda kind: telemetry.transaction_failures.labels(kind=kind).inc(),
            )
            stack.callback(checkpoint.close)
            telemetry.watch(checkpoint.progress.stalled_s)
            self._partitions.subscribe(
                consumer, checkpoint, self._gate, lambda: self.batches.settle(checkpoint)
            )
            backpressure = self._gate
            batch_size = self.settings.consumer.max_batch
            wait_s = self.settings.consumer.max_wait_ms / 1000.0
            in_flight = self.batches
            clock = self.stats.stages
            while not stop.is_set():
                telemetry.beat()
                # With a batch in inference, take only what is already fetched: waiting for
                # more would hold that batch's outputs back.
                mark = clock.start()
                messages = take_batch(consumer, batch_size, 0 if in_flight else wait_s)
                clock.stop("consume", mark)
                try:
                    # A rollback met in a rebalance callback is handled here, before any
                    # batch is prepared from these messages (they are read again).
                    if self._partitions.rewind_due is not None:
                        raise Rewind(self._partitions.rewind_due)
                    if forgetter.poll():  # erasure requests apply between batches
                        self._unsent_erasures = True
                    if messages:
                        in_flight.admit(messages, checkpoint)
                        self._unsent_erasures = False
                        if self._registry_hold.succeeded():  # the registry answers again
                            telemetry.held(None)
                    elif backpressure.held is not None and self._registry_hold.due():
                        # Try again (the batch is read anew). Still held, and not ready,
                        # until a batch decodes: a retry is no sign the registry is back.
                        backpressure.release(consumer)
                        log.info("input_released", reason="retrying the schema registry")
                    # The overlap invariant (`InFlight`): oldest first, in input order; none
                    # waits once the input is idle.
                    in_flight.finish_due(checkpoint, idle=not messages)
                    if self._unsent_erasures and not in_flight:  # no batch to carry them
                        checkpoint.begin_batch()
                        checkpoint.end_batch({}, self.store.take_changes())
                        self._unsent_erasures = False
                    if not in_flight and self._histograms.due() and self._histograms.counted:
                        checkpoint.begin_batch()  # an idle input: histograms go out alone
                        self._publish_histograms(checkpoint)
                        checkpoint.end_batch({}, None)
                    self.models.poll(lambda: self._settle_for_swap(checkpoint))
                except Rewind as rewind:
                    in_flight.discard()
                    self._partitions.rewind(consumer, str(rewind))
                except RegistryUnavailable as outage:
                    self._hold_input(consumer, messages, outage)
                unacked = checkpoint.sink.in_flight()
                if backpressure.update(consumer, unacked):
                    self.stats.pauses += 1
                mark = clock.start()
                try:
                    # May close a stretch or commit the open transaction.
                    checkpoint.tick(idle=not in_flight)
                except Rewind as rewind:
                    in_flight.discard()
                    self._partitions.rewind(consumer, str(rewind))
                telemetry.stage_seconds.labels("commit").observe(clock.stop("commit", mark))
                self._sample_state(unacked)
            try:
                in_flight.drain(checkpoint)
                if self._histograms.counted:
                    checkpoint.begin_batch()
                    self._publish_histograms(checkpoint)
                    checkpoint.end_batch({}, None)
                checkpoint.commit()
            except Rewind as rewind:
                # Rolled back: the partitions' next owner reads it again from the last commit.
                # The state here still holds the rolled-back batches: no snapshot of it when
                # the consumer's close revokes the partitions.
                in_flight.discard()
                self._partitions.rewind_due = str(rewind)
                log.warning("stopped_after_rollback", reason=str(rewind))
            log.info("pipeline_stopped", **self.stats.report())
        return self.stats

    def _hold_input(
        self, consumer: Consumer, messages: list[Message], outage: RegistryUnavailable
    ) -> None:
        """The registry did not answer a lookup this batch needs: the batch changed nothing
        (decode comes first), so put it back (each of its partitions seeks to its first
        offset in it), pause the input until the next try is due, and report not-ready
        until a batch decodes again. Batches already prepared finish as usual. Nothing is
        dead-lettered for an outage.
        """
        first: dict[tuple[str, int], int] = {}
        for message in messages:
            if message.error() is None:
                where = (message.topic() or "", message.partition() or 0)
                offset = message.offset() or 0
                first[where] = min(offset, first.get(where, offset))
        for (topic, partition), offset in first.items():
            consumer.seek(TopicPartition(topic, partition, offset))
        wait = self._registry_hold.failed()
        self._gate.hold(consumer, "schema_registry")
        self.telemetry.held(outage.cause)
        log.warning(
            "input_held",
            reason=str(outage),
            cause=outage.cause,
            retry_in_s=wait,
            partitions=sorted(partition for _, partition in first),
        )

    def _sample_state(self, in_flight: int) -> None:
        telemetry = self.telemetry
        telemetry.in_flight.set(in_flight)
        telemetry.users.set(self.store.users())
        now = time.monotonic()
        if now >= self._next_state_sample:  # sampled: a size walk is not free
            self._next_state_sample = now + 30
            telemetry.state_bytes.set(self.store.estimate_bytes())

    def close(self) -> None:
        """Stop the inference thread, then watching for models, and close the engines."""
        self.inference.close()
        self.models.close()

    def _settle_for_swap(self, checkpoint: Checkpoint) -> None:
        """Before swapped-out engines close: finish the batches in flight (after a rollback,
        wait until inference let go of them).
        """
        try:
            self.batches.drain(checkpoint)
        finally:
            self.batches.discard()

    def prepare(self, messages: list[Message], checkpoint: Checkpoint) -> _Batch:
        """Decode, skip replays, compute features (moving the state on), take the changelog
        records if the batch closes a stretch (`Checkpoint.closing`), and start inference.
        """
        started, started_cpu = time.perf_counter(), time.thread_time()
        started_ms = time.time() * 1000
        stage = self.telemetry.stage_seconds
        with stage.labels("decode").time():
            columns, valid, dead = self._decode(messages)
        decoded_cpu, decoded_at = time.thread_time(), time.perf_counter()
        with stage.labels("features").time():
            late_before = self._updater.late
            rows, features = self._updater.process(columns, valid)
            self.store.evict()
            changes = self.store.take_changes() if checkpoint.closing() else None
        featured_cpu, featured_at = time.thread_time(), time.perf_counter()
        request = self._scorer.prepare(columns, rows, features)
        inference = self.inference.submit(request)
        done_cpu, done = time.thread_time(), time.perf_counter()
        return _Batch(
            messages=messages,
            columns=columns,
            rows=rows,
            replayed=len(valid) - len(rows),
            dead=dead,
            features=features,
            changes=changes,
            late=self._updater.late - late_before,
            request=request,
            inference=inference,
            started_ms=started_ms,
            decode_s=decoded_at - started,
            features_s=featured_at - decoded_at,
            prepare_s=done - featured_at,
            cpu_s=(decoded_cpu - started_cpu, featured_cpu - decoded_cpu, done_cpu - featured_cpu),
        )

    def finish(self, batch: _Batch, checkpoint: Checkpoint) -> None:
        """Wait for the batch's inference, produce its outputs, hand it to the checkpoint."""
        started, started_cpu = time.perf_counter(), time.thread_time()
        stage = self.telemetry.stage_seconds
        with stage.labels("inference_wait").time():
            inference = batch.inference.result()
        if inference.shadow_error is not None:
            self.models.stop_failed_shadow(batch.request, inference.shadow_error)
        stage.labels("inference").observe(inference.seconds)
        shaping = time.perf_counter()
        scored = self._scorer.shape(batch.columns, batch.rows, batch.request, inference)
        encoding_cpu, encoding = time.thread_time(), time.perf_counter()
        stage.labels("score").observe(batch.prepare_s + encoding - shaping)
        encoded = self._encoder.encode(batch.columns, scored)
        producing_cpu, producing = time.thread_time(), time.perf_counter()
        stage.labels("encode").observe(producing - encoding)
        headers = debug_headers(
            self.settings.processing,
            batch.columns.ingest_time[batch.rows],
            batch.features,
            batch.started_ms,
            (batch.decode_s, batch.features_s, inference.seconds),
        )
        self._histograms.add(batch.request.fraud, batch.features, scored.score)
        if batch.request.shadow is not None and scored.shadow is not None:
            self._histograms.add(batch.request.shadow, batch.features, scored.shadow.score)
        checkpoint.begin_batch()
        checkpoint.sink.publish(batch.columns, scored, encoded, batch.dead, headers)
        if self._histograms.due():
            self._publish_histograms(checkpoint)
        checkpoint.end_batch(
            _next_offsets(self.settings.topics.input, batch.columns), batch.changes
        )
        done_cpu, done = time.thread_time(), time.perf_counter()
        stage.labels("produce").observe(done - producing)
        clock = self.stats.stages
        decode_cpu, features_cpu, prepare_cpu = batch.cpu_s
        clock.add("decode", batch.decode_s, decode_cpu)
        clock.add("features", batch.features_s, features_cpu)
        clock.add(
            "score", batch.prepare_s + encoding - started, prepare_cpu + encoding_cpu - started_cpu
        )
        clock.add("encode", producing - encoding, producing_cpu - encoding_cpu)
        clock.add("produce", done - producing, done_cpu - producing_cpu)
        count_batch(
            self.stats,
            self.telemetry,
            self.settings.topics,
            len(batch.messages),
            batch.replayed,
            batch.late,
            scored,
            batch.dead,
            batch.columns.ingest_time[batch.rows],
        )
        prepared_s = batch.decode_s + batch.features_s + batch.prepare_s
        self.stats.busy_s += prepared_s + time.perf_counter() - started

    def _publish_histograms(self, checkpoint: Checkpoint) -> None:
        """The input histograms counted since the last, into the open batch."""
        topic = self.settings.topics.input_histograms
        checkpoint.sink.publish_records(topic, self._histograms.take())

    def _decode(self, messages: list[Message]) -> tuple[EventColumns, np.ndarray, list[DeadLetter]]:
        """The batch's messages without errors as columns, the rows that are valid events,
        and the dead letters of the rest.
        """
        good = []
        for message in messages:
            error = message.error()
            if error is None:
                good.append(message)
            else:
                raise_if_fatal(error, message)
        columns, rejected = self._decoder.decode(good, int(time.time() * 1000))
        self.stats.consumed += len(good)  # after decode: a held batch is consumed again
        dead = [dead_letter(good[r.row], r, self._redact) for r in rejected]
        return columns, np.flatnonzero(columns.status == OK), dead


def _next_offsets(topic: str, columns: EventColumns) -> Offsets:
    """The batch's next offset per partition, from its offset column: a few numpy calls a
    batch instead of reading every message's position.
    """
    if not len(columns):
        return {}
    order = np.lexsort((columns.offset, columns.partition))
    partitions, offsets = columns.partition[order], columns.offset[order]
    last = np.flatnonzero(np.diff(partitions, append=-1) != 0)  # each partition's highest
    return {
        (topic, partition): offset + 1
        for partition, offset in zip(partitions[last].tolist(), offsets[last].tolist(), strict=True)
    }


def warm_kernels() -> float:
    """Run every compiled kernel once on a one-event batch, so that none compiles (or loads
    from numba's cache) while events wait; returns the seconds it took. The Dockerfiles call
    it at build time (`streamscore warm`) so that a container starts from the cache.
    """
    started = time.perf_counter()
    record: dict[str, Any] = {f["name"]: None for f in schemas.raw(schemas.CLICK_EVENT)["fields"]}
    record |= {
        "event_id": "e", "user_id": "u", "session_id": "s", "event_time": 0,
        "event_type": "purchase", "item_id": 1, "category_id": 1, "device_id": "d",
        "ip": "i", "country": "DE", "user_agent": "a", "candidates": [1],
    }  # fmt: skip
    columns, _ = BatchDecoder(LimitSettings(max_event_age_s=1e12)).decode_values(
        [Encoder(schemas.CLICK_EVENT).encode(record)], [b"u"], np.zeros((1, 3), np.int64), 0
    )
    table = UserTable(2, max_users=1, ttl_s=1.0)
    featurizer = Featurizer(table, Pseudonyms.ephemeral(), 1800)
    rows, features = featurizer.process(columns, np.zeros(1, dtype=np.int64))
    columns_in = features.numeric.shape[1] + features.categorical.shape[1] + 1
    one_bin = Profile(("c",) * columns_in, (np.zeros(0),) * columns_in, np.ones(columns_in))
    one_bin.histogram(features.numeric, features.categorical, np.zeros(1, np.float32))
    table.evict()
    changes = table.take_changes()
    partitions, keys = [c.partition for c in changes], [c.key for c in changes]
    restored = UserTable(2)  # a changelog's restore into new users, then a snapshot's load
    restored.restore(partitions, keys, [c.value for c in changes])
    state = restored.export(partitions[0])
    if state is not None:
        UserTable(2).load(partitions[0], state)
    table.restore(partitions, keys, [None])  # a tombstone of a held user
    empty = np.zeros((1, 1))
    scored = Scored(
        rows=rows, score=np.zeros(1, np.float32), decision=np.zeros(1, np.int64),
        reasons=empty.astype(np.int64), contributions=empty.astype(np.float32),
        reason_count=np.ones(1, np.int64), fraud_model=("m", "1"), ranked=rows,
        items=empty.astype(np.int64), item_scores=empty.astype(np.float32),
        item_count=np.ones(1, np.int64), ranking_model=("m", "1"), scored_time=0,
    )  # fmt: skip
    OutputEncoder().encode(columns, scored)
    warm_scoring()
    return time.perf_counter() - started


def run_pipeline(
    settings: Settings, stop: threading.Event, stats_file: Path | None = None
) -> RunStats:
    """Warm the kernels, register the output schemas, load the engines, run until `stop`,
    close everything, optionally write stats.
    """
    settings.privacy.secret()  # no key: fail now, naming the setting, before any work
    log.info("kernels_warm", seconds=round(warm_kernels(), 3))
    catalog = connect_catalog(
        settings.schema_registry,
        pipeline_outputs(settings),
        lambda outage: log.warning("schema_registry_waiting", reason=str(outage)),
    )
    log.info("schema_catalog", **catalog.describe())
    fraud_pin, ranking_pin = settings.engine.pins()
    fraud = load_engine(fraud_pin, settings.engine)
    ranking = load_engine(ranking_pin, settings.engine)
    try:
        pipeline = Pipeline(settings, fraud, ranking, catalog)
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
        stats_file.write_text(json.dumps(stats.report()))
    return stats

"""`streamscore monitor`: read the scores served and the delayed labels, join them, and
report online quality per model version.

One process reads every partition of the fraud-score topic (read_committed), of the shadow
topic (a challenger's scores of the same events), of the labels topic, and of the
pipeline's input histograms (for PSI). Scores are keyed by user id and labels by event id,
so the two sides of one event sit in unrelated partitions, and a consumer group would split
them between members: run one monitor per pipeline (`replicas: 1`).

Each scored role (champion, challenger) has its own join. Every label is offered to both
while a challenger has been shadowed within the join window, and the labels that join both
roles' scores of their event feed `contest`: with `monitor.promote`, the challenger is
promoted when it beats the champion there by the policy's margins (`policy.py`), and every
verdict is logged with its figures.

PSI and the baseline figures the alerts compare with come from each version's manifest in
`engine.model_dir` (its drift profile and validation tally).

Every `monitor.report_interval_s`, one transaction holds: the changes to the waiting
records (`<group_id>.changelog`, compacted), a ModelQuality record per model version
(`topics.model_quality`), and the read positions (committed to `monitor.group_id`). A
restart restores the waiting records from the changelog and resumes at the committed
positions, so no pending join is lost and no record is read twice into the join. The
quality window itself is kept in memory: after a restart it fills again from the labels
that follow, and the model-quality topic holds the history.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import TopicPartition as Position
from prometheus_client import Counter, Gauge

import schemas
from engines.base import EngineError
from engines.drift import Profile
from engines.registry import CHALLENGER, CHAMPION, promote, resolve
from pipeline.kafka.admin import topic_partitions
from pipeline.kafka.clients import connect_catalog, producer_config
from pipeline.kafka.errors import kafka_error
from pipeline.kafka.messages import position, read_messages
from pipeline.kafka.transactions import transactional_call
from pipeline.logging import get_logger
from pipeline.monitor import policy, quality
from pipeline.monitor.join import LABELS, SCORES, Join, Pair
from pipeline.monitor.quality import Tally, Window, at_thresholds
from pipeline.settings import Settings
from pipeline.telemetry import Health
from pipeline.topics import create_topics, monitor_changelog, monitor_outputs
from schemas.catalog import Catalog, RegistryUnavailable
from schemas.codec import DecodeError, Decoder, Encoder

log = get_logger()
INPUTS, SHADOW = "inputs", "shadow"
ROLE_PREFIX = {CHAMPION: b"", CHALLENGER: b"c"}  # of each role's keys in the changelog


def ensure_monitor_topics(settings: Settings, timeout_s: float = 30) -> None:
    """Create the monitor's changelog, the model-quality topic and the topic it reads the
    pipeline's histograms from, when missing.
    """
    topics = settings.topics
    wanted = [
        monitor_changelog(settings),
        topics.model_quality,
        topics.input_histograms,
        topics.shadow_scores,
    ]
    create_topics(settings, wanted, timeout_s)


class MonitorTelemetry(Health):
    """The monitor's metrics, with the same `/healthz` and `/readyz` as the pipeline."""

    def __init__(self, liveness_timeout_s: float) -> None:
        """Create the monitor's metrics."""
        super().__init__(liveness_timeout_s)
        registry = self.registry
        self.quality = Gauge(
            "streamscore_model_quality",
            "Online fraud-model quality over the monitor's window, per model version and "
            "figure (NaN while undefined).",
            ["model_version", "figure"],
            registry=registry,
        )
        self.baseline = Gauge(
            "streamscore_model_baseline",
            "The same figures on the version's validation set, from its manifest: what the "
            "alerts compare the online figures with.",
            ["model_version", "figure"],
            registry=registry,
        )
        self.psi = Gauge(
            "streamscore_model_psi",
            "Population stability index of the served scores (feature=score) and of each "
            "feature against the version's training distribution, over the window.",
            ["model_version", "feature"],
            registry=registry,
        )
        self.joined_total = Counter(
            "streamscore_monitor_joined", "Scores joined to their label.", registry=registry
        )
        self.unjoined = Counter(
            "streamscore_monitor_unjoined",
            "Scores and labels that left the join without their other side: waited past "
            "monitor.join_window_s, or pushed out by monitor.max_pending; per scored role "
            "(the champion's scores, or a shadowed challenger's).",
            ["role", "side"],
            registry=registry,
        )
        self.pending = Gauge(
            "streamscore_monitor_pending",
            "Scores and labels waiting, per scored role.",
            ["role", "side"],
            registry=registry,
        )
        self.promotions = Counter(
            "streamscore_model_promotions",
            "Challengers the monitor promoted under its policy (monitor.promote).",
            registry=registry,
        )
        self.unreadable = Counter(
            "streamscore_monitor_unreadable",
            "Records the monitor could not decode, by topic (skipped).",
            ["topic"],
            registry=registry,
        )
        self.restored = Counter(
            "streamscore_monitor_restored",
            "Waiting records restored from the changelog at start.",
            registry=registry,
        )
        self.last_report = Gauge(
            "streamscore_monitor_last_report_timestamp_seconds",
            "When the monitor last committed a report (Unix time).",
            registry=registry,
        )


class Monitor:
    """Reads scores and labels, joins them, and reports quality until stopped."""

    def __init__(self, settings: Settings) -> None:
        """Nothing is read until `run`."""
        self._settings = settings
        monitor = settings.monitor
        self.joins = {
            role: Join(monitor.join_window_s, monitor.max_pending, prefix)
            for role, prefix in ROLE_PREFIX.items()
        }
        self.join = self.joins[CHAMPION]
        self.window = Window(monitor.quality_window_s, settings.decision)
        # Only the labels that joined both the champion's and the challenger's score of
        # their event: what the promotion policy compares.
        self.contest = Window(monitor.quality_window_s, settings.decision)
        self.telemetry = MonitorTelemetry(settings.telemetry.liveness_timeout_s)
        self.last_report: dict[str, dict[str, float]] = {}
        self.last_psi: dict[str, dict[str, float]] = {}
        self._next: dict[tuple[str, int], int] = {}  # next offset to read, per partition
        self._names: dict[str, str] = {}  # model version -> model name
        self._models: dict[str, _Reference | None] = {}  # model version -> its manifest's
        self._expired = {role: dict(join.expired) for role, join in self.joins.items()}
        self._roles: dict[str, str] = {}  # model version -> the role it was last scored in
        self._shadow_seen_ms = 0  # when a challenger's score was last read
        # The policy's last verdicts, newest last (one a report while a challenger is judged).
        self.verdicts: deque[dict[str, Any]] = deque(maxlen=100)
        self._promoted: set[str] = set()

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        """Restore, then consume and report until `stop` (setting `ready` once reading);
        the last report is committed on the way out.
        """
        settings = self._settings
        telemetry = self.telemetry
        if settings.telemetry.port:
            telemetry.serve(settings.telemetry.host, settings.telemetry.port)
        catalog = connect_catalog(settings.schema_registry, monitor_outputs(settings))
        ensure_monitor_topics(settings)
        encoder = Encoder(schemas.MODEL_QUALITY, catalog.output_id(schemas.MODEL_QUALITY))
        producer = Producer(
            producer_config(
                settings.kafka,
                f"{settings.monitor.group_id}.monitor",
                settings.processing.transaction_timeout_ms,
            )
        )
        transactional_call(producer.init_transactions)  # fences an older monitor
        consumer = Consumer(
            settings.kafka.client_config()
            | {
                "group.id": settings.monitor.group_id,
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": False,
            }
        )
        try:
            self._restore()
            self._assign(consumer)
            telemetry.engines_loaded()
            telemetry.joined()
            if ready is not None:
                ready.set()
            decoders = self._decoders(catalog)
            interval = settings.monitor.report_interval_s
            next_report = time.monotonic() + interval
            while not stop.is_set():
                telemetry.beat()
                self._take(consumer.consume(1000, 0.2), decoders, stop)
                if time.monotonic() >= next_report:
                    self._report(producer, consumer, encoder)
                    next_report = time.monotonic() + interval
            self._report(producer, consumer, encoder)
        finally:
            consumer.close()
            producer.flush(10)
            if settings.telemetry.port:
                telemetry.close()

    # -- start ----------------------------------------------------------------------------

    def _restore(self) -> None:
        """The waiting records, from the changelog's committed records."""
        topic = monitor_changelog(self._settings)
        started = time.perf_counter()
        records = [
            (key, message.value())
            for message in read_messages(
                self._settings.kafka, topic, timeout_s=600, progress=self.telemetry.beat
            )
            if (key := message.key())
        ]
        kept = 0
        for role, join in self.joins.items():
            restored = join.restore(records)
            kept += restored
            if role == CHALLENGER and restored:
                self._shadow_seen_ms = int(time.time() * 1000)  # it was shadowing
        self.telemetry.restored.inc(kept)
        log.info(
            "monitor_restored",
            topic=topic,
            records=len(records),
            waiting=kept,
            seconds=round(time.perf_counter() - started, 3),
        )

    def _assign(self, consumer: Consumer) -> None:
        """Every partition of both topics, from the committed positions (or the start)."""
        topics = self._settings.topics
        wanted = [
            Position(topic, partition)
            for topic in (
                topics.fraud_scores,
                topics.shadow_scores,
                topics.labels,
                topics.input_histograms,
            )
            for partition in topic_partitions(consumer, topic)
        ]
        committed = consumer.committed(wanted, timeout=30)
        consumer.assign(
            [
                Position(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                for tp in committed
            ]
        )
        for tp in committed:
            if tp.offset >= 0:
                self._next[tp.topic, tp.partition] = tp.offset
        log.info("monitor_assigned", partitions=len(wanted))

    def _decoders(self, catalog: Catalog) -> dict[str, tuple[str, Decoder]]:
        topics = self._settings.topics
        return {
            topics.fraud_scores: (SCORES, Decoder(schemas.FRAUD_SCORE, catalog)),
            topics.shadow_scores: (SHADOW, Decoder(schemas.FRAUD_SCORE, catalog)),
            topics.labels: (LABELS, Decoder(schemas.FRAUD_LABEL, catalog)),
            topics.input_histograms: (INPUTS, Decoder(schemas.INPUT_HISTOGRAM, catalog)),
        }

    # -- reading --------------------------------------------------------------------------

    def _take(
        self,
        messages: list[Message],
        decoders: dict[str, tuple[str, Decoder]],
        stop: threading.Event,
    ) -> None:
        """Join one fetch, then add what it served and joined to the window by version."""
        seen_ms = int(time.time() * 1000)
        window_ms = self._settings.monitor.join_window_s * 1000
        served: dict[str, list[int]] = defaultdict(list)
        pairs: list[Pair] = []
        contested: list[Pair] = []  # labels joined to both roles' scores
        for message in messages:
            error = message.error()
            if error is not None:
                raise KafkaException(error)
            topic, partition, offset = position(message)
            self._next[topic, partition] = offset + 1
            side, decoder = decoders[topic]
            record = self._decode(decoder, message, stop)
            if record is None:
                continue
            if side == INPUTS:
                self._add_inputs(record, topic, offset)
                continue
            if side in (SCORES, SHADOW):
                role = CHAMPION if side == SCORES else CHALLENGER
                if role == CHALLENGER:
                    self._shadow_seen_ms = seen_ms
                version = record["model_version"]
                scored_ms = record["scored_time"] or message.timestamp()[1]
                self._names[version] = record["model_name"]
                # Once promoted here, its shadow scores still in flight keep it a champion.
                self._roles[version] = CHAMPION if version in self._promoted else role
                served[version].append(scored_ms)
                pair = self.joins[role].score(
                    record["event_id"], version, record["score"], scored_ms, seen_ms
                )
                if pair is not None:
                    pairs.append(pair)
                continue
            labelled_ms = message.timestamp()[1]
            matched = []
            for role, join in self.joins.items():
                if role == CHALLENGER and seen_ms - self._shadow_seen_ms > window_ms:
                    continue  # no challenger shadowed within the join window: none to join
                pair = join.label(record["event_id"], record["is_fraud"], labelled_ms, seen_ms)
                if pair is not None:
                    matched.append(pair)
            pairs += matched
            if len(matched) == len(self.joins):
                contested += matched
        for version, times in served.items():
            self.window.served(version, np.array(times, dtype=np.int64))
        if pairs:
            self.telemetry.joined_total.inc(len(pairs))
            _add_pairs(self.window, pairs)
        if contested:
            _add_pairs(self.contest, contested)

    def _decode(
        self, decoder: Decoder, message: Message, stop: threading.Event
    ) -> dict[str, Any] | None:
        """The record, or None (counted) when it cannot be read. A registry that does not
        answer is waited for: the record is not unreadable, the lookup is unanswered.
        """
        backoff = 0.5
        while True:
            try:
                record = decoder.decode(message.value())
                if backoff > 0.5:
                    self.telemetry.held(None)
                return record
            except DecodeError as exc:
                topic, _, offset = position(message)
                self.telemetry.unreadable.labels(topic=topic).inc()
                log.warning("monitor_unreadable", topic=topic, offset=offset, kind=exc.kind)
                return None
            except RegistryUnavailable as exc:
                self.telemetry.held(exc.cause)
                log.warning("monitor_registry_unavailable", cause=exc.cause)
                if stop.wait(backoff):
                    raise
                backoff = min(2 * backoff, 10.0)

    def _add_inputs(self, record: dict[str, Any], topic: str, offset: int) -> None:
        """An input histogram, when its version's profile is known and its bins match."""
        version = record["model_version"]
        self._names.setdefault(version, record["model_name"])
        reference = self._reference(version)
        counts = np.array(record["counts"], dtype=np.int64)
        if reference is None or reference.profile is None:
            return  # no profile to compare with (said once, in _reference)
        if len(counts) != reference.profile.bins:
            self.telemetry.unreadable.labels(topic=topic).inc()
            log.warning("monitor_histogram_mismatch", topic=topic, offset=offset, version=version)
            return
        self.window.inputs(version, counts, record["end_time"])

    def _reference(self, version: str) -> _Reference | None:
        """The drift profile and validation figures of `version`, from its manifest in
        engine.model_dir; None (logged once) when that directory does not hold it.
        """
        if version in self._models:
            return self._models[version]
        name = self._names.get(version, "fraud")
        try:
            manifest = resolve(self._settings.engine.model_dir, name, version).manifest
        except EngineError as exc:
            log.warning("monitor_model_unknown", model=name, version=version, reason=str(exc))
            self._models[version] = None
            return None
        validation = manifest.get("validation")
        baseline = (
            quality.figures(at_thresholds(Tally.from_json(validation), self._settings.decision))
            if validation is not None
            else {}
        )
        reference = self._models[version] = _Reference(Profile.from_manifest(manifest), baseline)
        return reference

    # -- reporting ------------------------------------------------------------------------

    def _report(self, producer: Producer, consumer: Consumer, encoder: Encoder) -> None:
        """Expire, compute the figures, and commit changes, figures and positions in one
        transaction (an abortable failure is retried whole: nothing in memory changed).
        """
        settings = self._settings
        now_ms = time.time() * 1000
        telemetry = self.telemetry
        changes = []
        for join in self.joins.values():
            join.expire(now_ms)
            changes += join.changes()
        report = self.window.report(now_ms)
        psi = {version: self._psi(version) for version in report}
        records = [
            (
                version.encode(),
                encoder.encode(self._quality_record(version, f, psi[version], now_ms)),
            )
            for version, f in report.items()
        ]
        positions = [Position(t, p, o) for (t, p), o in self._next.items()]
        changelog, quality_topic = monitor_changelog(settings), settings.topics.model_quality
        while True:
            try:
                transactional_call(producer.begin_transaction, timed=False)
                for key, value in changes:
                    producer.produce(changelog, value, key)
                    producer.poll(0)
                for key, value in records:
                    producer.produce(quality_topic, value, key)
                if positions:
                    transactional_call(
                        producer.send_offsets_to_transaction,
                        positions,
                        consumer.consumer_group_metadata(),
                    )
                transactional_call(producer.commit_transaction)
                break
            except KafkaException as exc:
                error = kafka_error(exc)
                if not error.txn_requires_abort():
                    raise  # fatal (fenced by a newer monitor): a restart restores
                log.warning("monitor_transaction_aborted", reason=error.str())
                # a failed abort raises (fatal): the monitor stops and a restart restores
                transactional_call(producer.abort_transaction)
        for role, join in self.joins.items():
            expired = self._expired[role]
            for side, count in join.expired.items():
                telemetry.unjoined.labels(role=role, side=side).inc(count - expired[side])
                expired[side] = count
            for side, count in join.pending().items():
                telemetry.pending.labels(role=role, side=side).set(count)
        for version, online in report.items():
            for name, figure in online.items():
                telemetry.quality.labels(model_version=version, figure=name).set(figure)
            for feature, index in psi[version].items():
                telemetry.psi.labels(model_version=version, feature=feature).set(index)
            reference = self._reference(version)
            for name, figure in (reference.baseline if reference else {}).items():
                telemetry.baseline.labels(model_version=version, figure=name).set(figure)
        telemetry.last_report.set(now_ms / 1000.0)
        self.last_report, self.last_psi = report, psi
        log.info(
            "model_quality",
            versions={v: policy.rounded(f) for v, f in report.items()},
            psi_over_0_2={v: sorted(k for k, x in p.items() if x > 0.2) for v, p in psi.items()},
            roles={v: self._roles.get(v, CHAMPION) for v in report},
            pending={role: join.pending() for role, join in self.joins.items()},
            unjoined={role: join.expired for role, join in self.joins.items()},
            changelog_records=len(changes),
        )
        self.decide(self.contest.report(now_ms), act=settings.monitor.promote)

    def role(self, version: str) -> str:
        """The role `version` was last scored in (champion when not seen)."""
        return self._roles.get(version, CHAMPION)

    def decide(self, contest: dict[str, dict[str, float]], act: bool) -> None:
        """Apply the promotion policy (`policy.verdict`) to this report's `contest`: log
        each verdict with its figures and, when it may `act` (monitor.promote), promote a
        challenger that won; otherwise a win is logged as a recommendation for a person to
        promote by hand.
        """
        verdict = policy.verdict(contest, self.role, self._promoted, self._settings.monitor)
        if verdict is None:
            return
        verdict["promoted"] = verdict["won"] and act
        try:
            self._act(verdict, verdict["challenger"], act)
        finally:
            # Published once final: a reader never sees a promotion not yet made, or one
            # that then failed.
            self.verdicts.append(verdict)

    def _act(self, verdict: dict[str, Any], challenger: str, act: bool) -> None:
        """Log `verdict`, and promote `challenger` when it won and the policy may act."""
        if not verdict["won"]:
            log.info("model_promotion_refused", **verdict)
            return
        if not act:
            log.info("model_promotion_recommended", **verdict)
            return
        name = self._names.get(challenger, self._settings.engine.fraud_model)
        record = {"by": "streamscore monitor", "policy": verdict, "at_ms": int(time.time() * 1000)}
        try:
            promote(self._settings.engine.model_dir, name, challenger, record)
        except (EngineError, OSError) as exc:
            verdict["promoted"] = False
            log.warning("model_promotion_failed", error=str(exc), **verdict)
            return
        self._roles[challenger] = CHAMPION
        self._promoted.add(challenger)
        self.telemetry.promotions.inc()
        log.info("model_promoted", **verdict)

    def _psi(self, version: str) -> dict[str, float]:
        """PSI per input column and for the score over the window (empty without a profile
        or without histograms).
        """
        reference = self._reference(version)
        counts = self.window.input_counts(version)
        if reference is None or reference.profile is None or counts is None:
            return {}
        return {k: v for k, v in reference.profile.psi(counts).items() if not math.isnan(v)}

    def _quality_record(
        self, version: str, figures: dict[str, float], psi: dict[str, float], now_ms: float
    ) -> ModelQuality:
        def nullable(name: str) -> float | None:
            value = figures[name]
            return None if math.isnan(value) else value

        return ModelQuality(
            window_end=int(now_ms),
            window_s=self.window.window_s,
            model_name=self._names.get(version, ""),
            model_version=version,
            role=self._roles.get(version, CHAMPION),
            served=int(figures["served"]),
            labelled=int(figures["labelled"]),
            label_coverage=nullable("label_coverage"),
            label_delay_p50_s=nullable("label_delay_p50_s"),
            label_delay_p90_s=nullable("label_delay_p90_s"),
            positive_rate=nullable("positive_rate"),
            pr_auc=nullable("pr_auc"),
            precision_at_review=nullable("precision_at_review"),
            recall_at_review=nullable("recall_at_review"),
            precision_at_block=nullable("precision_at_block"),
            recall_at_block=nullable("recall_at_block"),
            ece=nullable("ece"),
            brier=nullable("brier"),
            psi=psi,
        )


class ModelQuality(TypedDict):
    """A ModelQuality record (schemas/model_quality.avsc): one version's figures over the
    window; a figure undefined so far (no labels, no positives) is null.
    """

    window_end: int
    window_s: float
    model_name: str
    model_version: str
    role: str
    served: int
    labelled: int
    label_coverage: float | None
    label_delay_p50_s: float | None
    label_delay_p90_s: float | None
    positive_rate: float | None
    pr_auc: float | None
    precision_at_review: float | None
    recall_at_review: float | None
    precision_at_block: float | None
    recall_at_block: float | None
    ece: float | None
    brier: float | None
    psi: dict[str, float]


def _add_pairs(window: Window, pairs: list[Pair]) -> None:
    """Joined scores into `window`, per model version."""
    by_version: dict[str, list[Pair]] = defaultdict(list)
    for pair in pairs:
        by_version[pair.version].append(pair)
    for version, rows in by_version.items():
        window.joined(
            version,
            np.array([p.score for p in rows]),
            np.array([p.is_fraud for p in rows], dtype=bool),
            np.array([p.scored_ms for p in rows], dtype=np.int64),
            np.array([p.labelled_ms for p in rows], dtype=np.int64),
        )


@dataclass(frozen=True, slots=True)
class _Reference:
    """What a model version's manifest says of its training: its drift profile (None for
    a version trained before profiles) and its validation figures (empty likewise).
    """

    profile: Profile | None
    baseline: dict[str, float]

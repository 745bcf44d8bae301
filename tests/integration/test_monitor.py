"""`streamscore monitor` on the real broker and registry: the join of scores and delayed
labels, its restart from the changelog and committed positions, and its metrics and
ModelQuality records.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from confluent_kafka import Producer

import schemas
from engines.registry import CHALLENGER, CHAMPION, resolve, versions
from pipeline.kafka.admin import admin_client, topic_partitions
from pipeline.kafka.clients import connect_catalog, producer_config
from pipeline.kafka.messages import read_messages
from pipeline.monitor.join import LABELS, SCORES
from pipeline.monitor.service import Monitor
from pipeline.tools.demo import read_topic
from pipeline.tools.loadgen import produce_clickstream
from pipeline.topics import monitor_changelog
from pipeline.training.generator import GeneratorConfig
from schemas.catalog import subject
from schemas.codec import Encoder
from tests.engines.publish import publish_copy
from tests.integration.running import Running as PipelineRunning
from tests.integration.test_registry import client

pytestmark = pytest.mark.integration


def score(event_id, value, scored_ms, version="7"):
    return {
        "event_id": event_id,
        "user_id": f"u-{event_id}",
        "event_time": scored_ms - 5,
        "score": value,
        "decision": "block" if value >= 0.9 else "allow",
        "reasons": [],
        "model_name": "fraud",
        "model_version": version,
        "ingest_time": scored_ms - 3,
        "scored_time": scored_ms,
    }


def produce(settings, topic, schema, records, key):
    """Records framed with the registry's id, as the pipeline and the generator write."""
    catalog = connect_catalog(settings.schema_registry, {topic: schema})
    producer = Producer(producer_config(settings.kafka))
    encoder = Encoder(schema, catalog.output_id(schema))
    for record in records:
        producer.produce(topic, encoder.encode(record), record[key].encode())
    assert producer.flush(30) == 0


class Running:
    """A Monitor on a thread until `close`."""

    def __init__(self, settings):
        self.monitor = Monitor(settings)
        self.stop, self.ready = threading.Event(), threading.Event()
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.ready.wait(60), self.error

    def _run(self):
        try:
            self.monitor.run(self.stop, self.ready)
        except BaseException as exc:
            self.error.append(exc)
            raise

    def metric(self, name, **labels):
        return self.monitor.telemetry.registry.get_sample_value(name, labels)

    def wait_joined(self, count, timeout_s=60):
        deadline = time.monotonic() + timeout_s
        while self.metric("streamscore_monitor_joined_total") < count:
            assert time.monotonic() < deadline, self.monitor.join.pending()
            assert not self.error, self.error
            time.sleep(0.1)

    def close(self):
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive() and not self.error, self.error


def test_join_survives_a_restart_and_reports_quality(registry_settings):
    settings = registry_settings.model_copy(
        update={
            "monitor": registry_settings.monitor.model_copy(
                update={"report_interval_s": 0.5, "join_window_s": 3600}
            )
        }
    )
    topics = settings.topics
    now = int(time.time() * 1000)
    # 100 scores; positives are events 0-9: 0-5 scored 0.95 (caught at block), 6-9 0.6.
    values = [0.95] * 6 + [0.6] * 4 + [0.05 + 0.008 * i for i in range(90)]
    scores = [score(f"e{i}", values[i], now - 1000 + i) for i in range(100)]
    labels = [{"event_id": f"e{i}", "is_fraud": i < 10, "pattern": ""} for i in range(100)]

    produce(settings, topics.fraud_scores, schemas.FRAUD_SCORE, scores[:60], "user_id")
    produce(settings, topics.labels, schemas.FRAUD_LABEL, labels[:30], "event_id")
    first = Running(settings)
    try:
        first.wait_joined(30)
        time.sleep(1.2)  # a report commits the waiting scores and the positions
        assert first.metric("streamscore_monitor_pending", role="champion", side=SCORES) == 30
    finally:
        first.close()

    # While it is down: the other 40 scores, 60 labels (30 for waiting scores, 30 for
    # scores not yet served), and 10 labels of events never served.
    produce(settings, topics.fraud_scores, schemas.FRAUD_SCORE, scores[60:], "user_id")
    orphans = [{"event_id": f"x{i}", "is_fraud": False, "pattern": ""} for i in range(10)]
    produce(settings, topics.labels, schemas.FRAUD_LABEL, labels[30:] + orphans, "event_id")
    second = Running(settings)
    try:
        assert second.metric("streamscore_monitor_restored_total") == 30
        second.wait_joined(70)
        time.sleep(1.2)
        # Nothing was read twice: a re-read label of e0-e29 would now wait (its score
        # joined before the restart), and a re-read score would wait for a label.
        assert second.monitor.join.pending() == {SCORES: 0, LABELS: 10}
        assert second.metric("streamscore_monitor_joined_total") == 70
        quality = second.monitor.last_report["7"]
    finally:
        second.close()

    # The second monitor's window holds the 70 labels it joined (e30-e99): no positive.
    assert quality["labelled"] == 70 and quality["positive_rate"] == 0
    assert second.metric("streamscore_model_quality", model_version="7", figure="labelled") == 70

    # The ModelQuality records, read back through the registry: the first monitor's last
    # record covers e0-e29 (10 positives, 6 caught at block).
    records = [r for r, _ in read_topic(settings, topics.model_quality, schemas.MODEL_QUALITY)]
    assert client(settings).get_latest_version(subject(topics.model_quality))
    first_last = [r for r in records if r["labelled"] == 30][-1]
    assert first_last["model_name"] == "fraud" and first_last["model_version"] == "7"
    assert first_last["recall_at_block"] == pytest.approx(0.6)
    assert first_last["precision_at_block"] == pytest.approx(1.0)
    assert first_last["recall_at_review"] == pytest.approx(1.0)
    assert first_last["positive_rate"] == pytest.approx(10 / 30)
    assert first_last["label_coverage"] == pytest.approx(30 / 60)
    assert records[-1]["labelled"] == 70 and records[-1]["pr_auc"] is None  # no positive
    # The changelog's latest record per key: only the 10 orphan labels still wait.
    assert waiting_in_changelog(settings) == {f"lx{i}".encode() for i in range(10)}

    # A third monitor with a short join window: the orphans it restores wait no longer,
    # leave counted unjoined, and leave the changelog.
    short = settings.monitor.model_copy(update={"join_window_s": 0.5})
    third = Running(settings.model_copy(update={"monitor": short}))
    try:
        assert third.metric("streamscore_monitor_restored_total") == 10
        deadline = time.monotonic() + 30
        while (
            third.metric("streamscore_monitor_unjoined_total", role="champion", side=LABELS) != 10
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert third.monitor.join.pending() == {SCORES: 0, LABELS: 0}
    finally:
        third.close()
    assert waiting_in_changelog(settings) == set()


def waiting_in_changelog(settings):
    latest = {}
    for message in read_messages(settings.kafka, monitor_changelog(settings)):
        latest[message.key()] = message.value()
    return {key for key, value in latest.items() if value is not None}


def test_pipeline_histograms_and_manifest_give_psi_and_baseline(kafka_settings):
    """The real pipeline scores generated events and publishes its input histograms; the
    monitor joins the generator's labels, and reads the serving version's manifest for PSI
    and the validation figures.
    """
    # A histogram topic nobody created: the pipeline creates it (the bench's topics, for
    # one, leave it out).
    topics = kafka_settings.topics
    settings = kafka_settings.model_copy(
        update={
            "monitor": kafka_settings.monitor.model_copy(
                update={"report_interval_s": 0.5, "histogram_interval_s": 0.2}
            ),
            "topics": topics.model_copy(
                update={"input_histograms": f"{topics.input}.histograms-made-at-start"}
            ),
        }
    )
    config = GeneratorConfig(events=3_000, users=300, seed=5).anchored_before(time.time())
    produce_clickstream(settings, config)
    pipeline = PipelineRunning(settings)
    topic_partitions(admin_client(settings.kafka), settings.topics.input_histograms, 60)  # made
    monitor = Running(settings)
    try:
        monitor.wait_joined(3_000, timeout_s=120)
        deadline = time.monotonic() + 30
        while not monitor.metric("streamscore_model_psi", model_version="1", feature="score"):
            assert time.monotonic() < deadline, monitor.monitor.last_report
            time.sleep(0.2)
    finally:
        pipeline.close()
        monitor.close()
    online = monitor.monitor.last_report["1"]
    assert online["labelled"] == 3_000 and online["served"] == 3_000
    baseline = monitor.metric("streamscore_model_baseline", model_version="1", figure="pr_auc")
    assert 0 < baseline <= 1
    features = resolve(settings.engine.model_dir, "fraud", "1").manifest["features"]
    psi = {
        name: monitor.metric("streamscore_model_psi", model_version="1", feature=name)
        for name in [*features, "score"]
    }
    assert all(value is not None and value >= 0 for value in psi.values()), psi
    histograms = read_topic(settings, settings.topics.input_histograms, schemas.INPUT_HISTOGRAM)
    assert sum(record["events"] for record, _ in histograms) == 3_000
    records = [
        r for r, _ in read_topic(settings, settings.topics.model_quality, schemas.MODEL_QUALITY)
    ]
    assert set(records[-1]["psi"]) == set(psi)


def test_champion_and_challenger_are_compared_on_the_same_labels_and_promoted_by_policy(
    kafka_settings, model_dir, tmp_path
):
    """Shadow scores on their own topic, every label joined to both roles; the policy
    refuses a challenger that is no better, then promotes it once it is, with its figures.
    """
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    champion = versions(models, "fraud")[-1]
    challenger = publish_copy(models, "fraud", role=CHALLENGER)
    settings = kafka_settings.model_copy(
        update={
            "monitor": kafka_settings.monitor.model_copy(
                update={
                    "report_interval_s": 0.5,
                    "promote": True,
                    "promote_min_labels": 50,
                    "promote_margin_recall": 0.1,
                }
            ),
            "engine": kafka_settings.engine.model_copy(update={"model_dir": models}),
        }
    )
    topics = settings.topics
    now = int(time.time() * 1000)

    def stretch(prefix, challenger_catches):
        # Positives are events 0-9: the champion scores them as it scores the negatives,
        # 0.05 (missed); the challenger the same, or 0.95 (caught at block).
        served = [0.05] * 50
        shadowed = [0.95 if challenger_catches else 0.05] * 10 + [0.05] * 40
        ids = [f"{prefix}{i}" for i in range(50)]
        produce(
            settings,
            topics.fraud_scores,
            schemas.FRAUD_SCORE,
            [
                score(e, v, now + i, champion)
                for i, (e, v) in enumerate(zip(ids, served, strict=True))
            ],
            "user_id",
        )
        produce(
            settings,
            topics.shadow_scores,
            schemas.FRAUD_SCORE,
            [
                score(e, v, now + i, challenger)
                for i, (e, v) in enumerate(zip(ids, shadowed, strict=True))
            ],
            "user_id",
        )
        labels = [{"event_id": e, "is_fraud": i < 10, "pattern": ""} for i, e in enumerate(ids)]
        produce(settings, topics.labels, schemas.FRAUD_LABEL, labels, "event_id")

    running = Running(settings)
    try:
        stretch("a", challenger_catches=False)
        running.wait_joined(100)
        wait_for(lambda: running.monitor.verdicts, "a verdict on 50 labels each")
        refused = running.monitor.verdicts[-1]
        assert not refused["promoted"] and refused["labelled"] == 50
        assert resolve(models, "fraud", challenger).manifest["role"] == CHALLENGER
        assert running.metric("streamscore_monitor_pending", role=CHALLENGER, side=SCORES) == 0

        stretch("b", challenger_catches=True)
        running.wait_joined(200)
        wait_for(lambda: running.monitor.verdicts[-1]["promoted"], "the promotion")
        promoted = running.monitor.verdicts[-1]
        assert running.metric("streamscore_model_promotions_total") == 1
    finally:
        running.close()
    assert (promoted["champion"], promoted["challenger"]) == (champion, challenger)
    assert promoted["labelled"] == 100
    assert promoted["champion_figures"]["recall_at_block"] == 0
    assert promoted["challenger_figures"]["recall_at_block"] == pytest.approx(0.5)
    manifest = resolve(models, "fraud", challenger).manifest
    assert manifest["role"] == CHAMPION and manifest["promotion"]["policy"] == promoted
    assert versions(models, "fraud")[-1] == challenger  # what `latest` serves now
    # Each role's ModelQuality records say which it was.
    records = [r for r, _ in read_topic(settings, topics.model_quality, schemas.MODEL_QUALITY)]
    roles = {(r["model_version"], r["role"]) for r in records}
    assert {(champion, CHAMPION), (challenger, CHALLENGER)} <= roles


def wait_for(condition, what, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout_s}s"
        time.sleep(0.1)

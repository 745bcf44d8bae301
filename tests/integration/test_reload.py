"""A model version published while the pipeline runs is swapped in without a restart."""

import shutil
import time
from collections import defaultdict

import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

import schemas
from engines.registry import resolve
from pipeline.kafka.clients import producer_config
from pipeline.tools.demo import read_topic
from pipeline.tools.local_broker import free_port
from pipeline.training.generator import GeneratorConfig, generate
from schemas.codec import Encoder
from tests.engines.publish import publish_copy
from tests.integration.running import Running
from tests.integration.test_pipeline import wait_for_commit
from tests.pipeline.test_telemetry import status

pytestmark = pytest.mark.integration


def test_reload_mid_stream_loses_and_repeats_nothing(kafka_settings, model_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    port = free_port()
    settings = kafka_settings.model_copy(
        update={
            "engine": kafka_settings.engine.model_copy(
                update={"model_dir": models, "reload_interval_s": 0.1}
            ),
            "telemetry": kafka_settings.telemetry.model_copy(update={"port": port}),
            # A batch in inference when the new version arrives: finished on the old one.
            "processing": kafka_settings.processing.model_copy(update={"inference_depth": 1}),
        }
    )
    config = GeneratorConfig(events=3000, users=80, seed=11).anchored_before(time.time())
    events = [event for event, _ in generate(config)]
    encoder = Encoder(schemas.CLICK_EVENT)
    producer = Producer(producer_config(settings.kafka))  # idempotent: keeps production order

    def produce(chunk):
        for event in chunk:
            producer.produce(
                settings.topics.input, key=event["user_id"].encode(), value=encoder.encode(event)
            )
        assert producer.flush(30) == 0

    running = Running(settings)
    try:
        produce(events[:1000])
        wait_for_commit(settings, running=running)
        old_fraud = resolve(models, "fraud").version
        new_fraud = publish_copy(models, "fraud")
        new_ranking = publish_copy(models, "ranking")
        for start in range(1000, 2000, 100):  # the swap may land in here, or after it
            produce(events[start : start + 100])
            time.sleep(0.05)
        wait_until_serving(port, {"fraud": new_fraud, "ranking": new_ranking}, running)
        produce(events[2000:])  # after the swap, whatever the machine's speed
        wait_for_commit(settings, running=running)
    finally:
        running.close()

    scores = [r for r, _ in read_topic(settings, settings.topics.fraud_scores, schemas.FRAUD_SCORE)]
    assert sorted(r["event_id"] for r in scores) == sorted(e["event_id"] for e in events)
    versions_by_user = defaultdict(list)
    for record in scores:  # a user's records share a partition, so they are in order
        versions_by_user[record["user_id"]].append(record["model_version"])
    assert {v for sequence in versions_by_user.values() for v in sequence} == {
        old_fraud,
        new_fraud,
    }
    for sequence in versions_by_user.values():
        switched = sequence.index(new_fraud) if new_fraud in sequence else len(sequence)
        assert set(sequence[switched:]) <= {new_fraud}, sequence

    recs = [
        r for r, _ in read_topic(settings, settings.topics.recommendations, schemas.RECOMMENDATION)
    ]
    assert new_ranking in {r["model_version"] for r in recs}
    assert len({r["event_id"] for r in recs}) == len(recs)


def wait_until_serving(port, versions, running, timeout_s=60):
    """Until the pipeline's engine_info metric shows `versions` (role → version) served."""
    deadline = time.monotonic() + timeout_s
    while True:
        running.check()
        _, body = status(port, "/metrics")
        serving = {
            sample.labels["role"]: sample.labels["version"]
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == "streamscore_engine_info"
        }
        if serving == versions:
            return
        assert time.monotonic() < deadline, f"serving {serving} after {timeout_s}s, not {versions}"
        time.sleep(0.1)


def test_a_challenger_is_shadow_scored_beside_the_champion_and_never_decides(
    kafka_settings, model_dir, tmp_path
):
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    port = free_port()
    settings = kafka_settings.model_copy(
        update={
            "engine": kafka_settings.engine.model_copy(
                update={"model_dir": models, "reload_interval_s": 0.1}
            ),
            "telemetry": kafka_settings.telemetry.model_copy(update={"port": port}),
        }
    )
    topics = settings.topics
    config = GeneratorConfig(events=2000, users=80, seed=12).anchored_before(time.time())
    events = [event for event, _ in generate(config)]
    encoder = Encoder(schemas.CLICK_EVENT)
    producer = Producer(producer_config(settings.kafka))

    def produce(chunk):
        for event in chunk:
            producer.produce(
                topics.input, key=event["user_id"].encode(), value=encoder.encode(event)
            )
        assert producer.flush(30) == 0

    champion = resolve(models, "fraud").version
    running = Running(settings)
    try:
        produce(events[:500])
        wait_for_commit(settings, running=running)
        challenger = publish_copy(models, "fraud", role="challenger")  # the same weights
        deadline = time.monotonic() + 60
        # Small chunks, one every 0.1 s, until the shadow scores something: all at once, a
        # fast pipeline could score them all before it swaps the challenger in, and then
        # nothing would be left to shadow-score.
        pending = [events[start : start + 10] for start in range(500, 1000, 10)]
        while not produced(port, topics.shadow_scores):
            running.check()
            assert time.monotonic() < deadline, "nothing shadow-scored after 60 s"
            if pending:
                produce(pending.pop(0))
            time.sleep(0.1)
        for chunk in pending:
            produce(chunk)
        produce(events[1000:])  # all of these after the challenger was loaded
        wait_for_commit(settings, running=running)
    finally:
        running.close()

    served = {
        r["event_id"]: r for r, _ in read_topic(settings, topics.fraud_scores, schemas.FRAUD_SCORE)
    }
    shadow = {
        r["event_id"]: r for r, _ in read_topic(settings, topics.shadow_scores, schemas.FRAUD_SCORE)
    }
    assert len(served) == len(events)
    assert {r["model_version"] for r in served.values()} == {champion}  # it never decides
    assert {r["model_version"] for r in shadow.values()} == {challenger}
    assert {e["event_id"] for e in events[1000:]} <= set(shadow) <= set(served)
    for event_id, record in shadow.items():  # same weights, same rows: the same scores
        assert record["score"] == pytest.approx(served[event_id]["score"], abs=1e-6)
        assert record["user_id"] == served[event_id]["user_id"]


def produced(port, topic):
    """The pipeline's count of records produced to `topic`, from its /metrics."""
    _, body = status(port, "/metrics")
    return sum(
        sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "streamscore_produced_total" and sample.labels.get("topic") == topic
    )

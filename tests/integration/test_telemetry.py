"""A running pipeline's metrics, probes and group lag on the real broker."""

import json
import time

import pytest
from confluent_kafka import Consumer

from pipeline.serve.produce import TIMING_HEADER
from pipeline.tools.local_broker import free_port
from pipeline.topics import group_lag
from pipeline.training.generator import GeneratorConfig, generate
from tests.integration.running import Running
from tests.integration.test_pipeline import produce_with_bad_input, wait_for_commit
from tests.pipeline.test_telemetry import status

pytestmark = pytest.mark.integration


def test_metrics_probes_and_lag_while_running(kafka_settings):
    port = free_port()
    settings = kafka_settings.model_copy(
        update={
            "telemetry": kafka_settings.telemetry.model_copy(
                update={"port": port, "statistics_interval_ms": 200}
            ),
            "processing": kafka_settings.processing.model_copy(update={"emit_timing": True}),
        }
    )
    config = GeneratorConfig(events=800, users=40, seed=9).anchored_before(time.time())
    expected_dead, events = produce_with_bad_input(settings, list(generate(config)))
    assert sum(row.lag for row in group_lag(settings)) == len(events) + len(expected_dead)

    running = Running(settings)
    try:
        wait_for_commit(settings, running=running)
        deadline = time.monotonic() + 30
        while status(port, "/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status(port, "/readyz")[0] == 200
        assert status(port, "/healthz")[0] == 200
        # The lag gauge comes from librdkafka's statistics, every 200 ms: wait for one.
        deadline = time.monotonic() + 30
        while "streamscore_consumer_lag{" not in (body := status(port, "/metrics")[1]):
            assert time.monotonic() < deadline, "no streamscore_consumer_lag sample in 30s"
            time.sleep(0.1)
        rows = group_lag(settings)
    finally:
        running.close()

    assert f'streamscore_consumed_total{{topic="{settings.topics.input}"}}' in body
    assert (
        f'streamscore_produced_total{{topic="{settings.topics.fraud_scores}"}} {len(events)}.0'
        in body
    )
    reasons = {kind for _, _, kind in expected_dead}
    for reason in reasons:
        assert f'streamscore_dead_letters_total{{reason="{reason}"}}' in body
    assert 'streamscore_engine_info{backend="onnxruntime"' in body
    assert "streamscore_end_to_end_seconds_count" in body
    assert [row.lag for row in rows] == [0] * settings.topics.partitions
    assert all(row.owner for row in rows)

    timings = first_headers(settings, settings.topics.fraud_scores, TIMING_HEADER, 50)
    assert len(timings) == 50
    for timing in map(json.loads, timings):
        assert set(timing) == {"queue_ms", "decode_ms", "features_ms", "inference_ms"}
        assert timing["queue_ms"] >= 0 and timing["inference_ms"] > 0


def first_headers(settings, topic, name, count):
    consumer = Consumer(
        settings.kafka.client_config()
        | {"group.id": f"reader-{time.monotonic_ns()}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    found = []
    try:
        deadline = time.monotonic() + 30
        while len(found) < count and time.monotonic() < deadline:
            for message in consumer.consume(count, 1.0):
                if message.error() is None:
                    found.append(dict(message.headers() or [])[name].decode())
    finally:
        consumer.close()
    return found[:count]

"""Telemetry's health rules, lag from librdkafka statistics, GC pauses, and its HTTP
endpoints.
"""

import gc
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pipeline.telemetry import Telemetry, observe_many
from pipeline.tools.local_broker import free_port


def status(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def test_ready_only_after_engines_join_and_restore():
    telemetry = Telemetry()
    assert telemetry.alive() and not telemetry.ready()
    telemetry.engines_loaded()
    assert not telemetry.ready()
    telemetry.restoring(True)
    telemetry.joined()
    assert not telemetry.ready()
    telemetry.restoring(False)
    assert telemetry.ready()


def test_a_stalled_loop_is_not_alive():
    telemetry = Telemetry(liveness_timeout_s=0.0)
    telemetry._beat -= 1
    assert not telemetry.alive() and not telemetry.ready()


def test_a_loop_that_beats_but_commits_nothing_is_not_alive():
    # Issue #48: liveness must go bad before max.poll.interval.ms expels a stuck member,
    # including when the loop still turns but every commit fails.
    telemetry = Telemetry(liveness_timeout_s=60)
    stalled = [0.0]
    telemetry.watch(lambda: stalled[0])
    telemetry.beat()
    assert telemetry.alive()
    stalled[0] = 61.0
    telemetry.beat()
    assert not telemetry.alive()
    assert not telemetry.ready()


def test_lag_comes_from_librdkafka_statistics():
    telemetry = Telemetry()
    stats = {
        "topics": {
            "clicks": {
                "partitions": {
                    "0": {"consumer_lag": 7},
                    "1": {"consumer_lag": -1},  # not known yet: not exported
                    "-1": {"consumer_lag": 0},  # librdkafka's internal UA partition
                }
            }
        }
    }
    telemetry.on_stats(json.dumps(stats))
    samples = {
        tuple(sorted(s.labels.items())): s.value
        for metric in telemetry.registry.collect()
        if metric.name == "streamscore_consumer_lag"
        for s in metric.samples
    }
    assert samples == {(("partition", "0"), ("topic", "clicks")): 7.0}


def test_endpoints_serve_metrics_and_probes():
    telemetry = Telemetry()
    port = telemetry.serve("127.0.0.1", free_port())
    try:
        telemetry.dead_letters.labels(reason="decode.truncated").inc()
        code, body = status(port, "/metrics")
        assert code == 200
        assert 'streamscore_dead_letters_total{reason="decode.truncated"} 1.0' in body
        assert status(port, "/healthz")[0] == 200
        assert status(port, "/readyz")[0] == 503
        telemetry.engines_loaded()
        telemetry.joined()
        assert status(port, "/readyz")[0] == 200
        assert status(port, "/nope")[0] == 404
    finally:
        telemetry.close()


def test_gc_pauses_are_timed_only_while_watched():
    telemetry = Telemetry()

    def collections():
        return telemetry.registry.get_sample_value(
            "streamscore_gc_pause_seconds_count", {"generation": "2"}
        )

    telemetry.watch_gc()
    try:
        gc.collect()
        gc.collect()
    finally:
        telemetry.unwatch_gc()
    assert collections() == 2
    gc.collect()
    assert collections() == 2


@given(
    st.lists(st.floats(-1.0, 100.0) | st.sampled_from([0.0, 0.005, 0.01, 2.5, 1e9]), max_size=50)
)
def test_observe_many_equals_one_observe_per_value(values):
    one, many = CollectorRegistry(), CollectorRegistry()
    for registry in (one, many):
        Histogram("h", "", buckets=(0.005, 0.01, 0.1, 2.5, 10.0), registry=registry)
    single = one._names_to_collectors["h"]
    for value in values:
        single.observe(value)
    observe_many(many._names_to_collectors["h"], np.asarray(values, dtype=np.float64))

    def exposed(registry):  # buckets and count exactly; the sum in another order
        lines = generate_latest(registry).decode().splitlines()
        total = next(float(line.split()[1]) for line in lines if line.startswith("h_sum"))
        return [line for line in lines if "_created" not in line and "_sum" not in line], total

    (lines, total), (expected_lines, expected_total) = exposed(many), exposed(one)
    assert lines == expected_lines
    assert total == pytest.approx(expected_total)

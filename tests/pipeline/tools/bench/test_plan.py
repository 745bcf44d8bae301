"""`streamscore plan` arithmetic on hand-made bench results."""

import math

import pytest

from pipeline.settings import ConsumerSettings
from pipeline.tools.bench.plan import PlanError, recommend


def results(p99s=(8.0, 15.0, 40.0), max_eps=10_000.0, sweep=None):
    latency = [
        {"fraction": f, "achieved_eps": max_eps * f, "p99_ms": p99}
        for f, p99 in zip((0.25, 0.5, 0.75), p99s, strict=True)
    ]
    entry = {"throughput_eps": max_eps, "latency": latency}
    out = {
        "run": "r1",
        "machine": {"cores": 2, "cpu_model": "test"},
        "configs": {"streamscore_alo_1p": entry, "streamscore_eos_1p": dict(entry)},
    }
    if sweep is not None:
        out["sweep"] = {"batch_size": [{"value": v, "throughput_eps": t} for v, t in sweep]}
    return out


def test_replicas_come_from_the_highest_load_that_met_the_slo():
    advice = recommend(results(), target_eps=42_000, latency_slo_ms=25)
    assert advice.per_pod_eps == 5000  # 50% of max: p99 15 ms ≤ 25; 75% missed
    assert advice.slo_met_in_bench
    assert advice.replicas == math.ceil(42_000 / 5000) == 9
    assert advice.partitions == 24  # first even-splitting count ≥ 18
    assert advice.max_replicas == advice.partitions
    assert advice.lag_threshold == max(100, int(5000 * 0.025))
    assert any("ceil(42,000 / 5,000) = 9" in line for line in advice.reasoning)


def test_batch_is_the_smallest_within_90_percent_capped_by_the_slo():
    sweep = [(32, 6000), (128, 9500), (500, 10_000), (2000, 9800)]
    advice = recommend(results(sweep=sweep), target_eps=5000, latency_slo_ms=30)
    # 128 is within 90% of 10,000; the cap is 5000/s × 30 ms / 5 = 30 events.
    assert advice.max_batch == 30
    loose = recommend(results(sweep=sweep), target_eps=5000, latency_slo_ms=1000)
    assert loose.max_batch == 128
    # A fifth of the SLO, capped at 20 (the default is 5: a 25 ms SLO's).
    assert loose.max_wait_ms == 20 and advice.max_wait_ms == 6
    assert recommend(results(), 5000, latency_slo_ms=10).max_wait_ms == 2


def test_without_a_sweep_the_batch_is_the_default_capped_by_the_slo():
    loose = recommend(results(), target_eps=5000, latency_slo_ms=10_000)
    assert loose.max_batch == ConsumerSettings().max_batch == 2000
    # 5000/s per pod (50% of max met 25 ms) × 25 ms / 5 = 25 events.
    assert recommend(results(), target_eps=5000, latency_slo_ms=25).max_batch == 25


def test_an_unmet_slo_is_said_and_planned_at_the_lowest_load():
    advice = recommend(results(p99s=(300.0, 400.0, 900.0)), target_eps=10_000, latency_slo_ms=25)
    assert not advice.slo_met_in_bench
    assert advice.per_pod_eps == 2500
    assert advice.replicas == 4
    assert any("No measured load met" in line for line in advice.reasoning)


def test_exactly_once_reads_its_own_configuration_and_missing_ones_are_refused():
    data = results()
    data["configs"]["streamscore_eos_1p"] = {
        "throughput_eps": 4000.0,
        "latency": [{"fraction": 0.5, "achieved_eps": 2000.0, "p99_ms": 20.0}],
    }
    assert recommend(data, 8000, 25, "exactly_once").replicas == 4
    del data["configs"]["streamscore_eos_1p"]
    with pytest.raises(PlanError, match="no streamscore_eos_1p"):
        recommend(data, 8000, 25, "exactly_once")
    with pytest.raises(PlanError, match="positive"):
        recommend(data, 0, 25)

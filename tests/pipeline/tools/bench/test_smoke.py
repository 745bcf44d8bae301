"""`streamscore bench` at its smoke size: every configuration and phase runs against the
real broker and the report files are written. Figures are not checked: benchmarks are not
tests, and this machine's timing is not stable enough to assert on.
"""

import json
import math
import re

import pytest

from pipeline.kafka.admin import admin_client
from pipeline.serve.counts import STAGES
from pipeline.tools.bench.report import PLOT_LATENCY, PLOT_SWEEP, PROFILE, latest, run_bench
from pipeline.tools.bench.workload import CONFIGS, Plan
from pipeline.training.generator import USER_AGENTS, GeneratorConfig, generate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REQUIRED = ("throughput_eps", "p50_ms", "p95_ms", "p99_ms", "cpu_percent", "rss_mb")


def test_smoke_run_writes_results_report_plots_and_profile(kafka_settings, tmp_path):
    said: list[str] = []
    results = run_bench(kafka_settings, Plan.smoke(), tmp_path, said.append)
    # Every latency point started once the one before had checkpointed (the group committed
    # all it was offered), not after the wait for it ran out.
    assert not [line for line in said if "not all committed" in line]

    run_dir = tmp_path / results["run"]
    assert latest(tmp_path) == run_dir / "results.json"
    written = json.loads((run_dir / "results.json").read_text())
    assert set(written["configs"]) == {config.name for config in CONFIGS}
    for name, entry in written["configs"].items():
        for key in REQUIRED:
            assert isinstance(entry[key], int | float), (name, key)
        assert [p["fraction"] for p in entry["latency"] if not p["fixed"]] == [0.25, 0.5, 0.75]
        fixed = [p["offered_eps"] for p in entry["latency"] if p["fixed"]]
        expected = [300.0] if entry["throughput_eps"] > 300 else []
        if name == "ceiling":  # and at the rate of the subject's 50% point, after it
            subject_rate = written["configs"]["streamscore_alo_1p"]["latency_eps"]
            expected += [subject_rate] if entry["throughput_eps"] > subject_rate else []
        assert fixed == expected, name
        assert entry["rss_mb"] > 0, name
        if name.startswith("streamscore"):
            # Each of these processed the whole backlog, and a read_committed consumer read
            # an output for every live event at every rate.
            assert entry["outputs_measured"] == Plan.smoke().events, name
            assert entry["throughput_eps"] > 0, name
            # The stage table: every stage timed by the process itself, per event.
            assert set(entry["stages_us"]) == set(STAGES), name
            assert all(value >= 0 for value in entry["stages_us"].values()), name
            assert entry["stages_us"]["decode"] > 0 and entry["stages_us"]["features"] > 0
            # The loop thread's CPU in each stage: timed too, and never above its wall time
            # (rounding to 0.01 µs aside).
            cpu = entry["stages_cpu_us"]
            assert set(cpu) == set(STAGES), name
            assert cpu["decode"] > 0 and cpu["features"] > 0 and cpu["produce"] > 0, name
            assert all(cpu[s] <= entry["stages_us"][s] + 0.02 for s in STAGES), (name, cpu)
            for point in entry["latency"]:
                assert point["received"] == point["events"], (name, point)
                assert not math.isnan(point["p99_ms"])
                # Each output's part up to its own timestamp is within its latency.
                assert 0 <= point["p99_to_output_ms"] <= point["p99_ms"], (name, point)
        if name in ("ceiling", "peer_quix"):  # outputs with the input's timestamp: no split
            assert all(math.isnan(p["p99_to_output_ms"]) for p in entry["latency"])
    machine = written["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"]
    assert {"confluent-kafka", "librdkafka", "quixstreams", "kafka"} <= set(machine["versions"])
    assert {row["target"] for row in written["targets"]} >= {"alo_1p / ceiling", "eos_1p / alo_1p"}
    # Beside the subject's p99s, the ceiling's at the same offered rates.
    rows = {row["target"]: row for row in written["targets"]}
    bounds = written["configs"]["ceiling"]["fixed_rate_p99_ms"]
    subject_rate = f"{written['configs']['streamscore_alo_1p']['latency_eps']:.0f}"
    assert rows["alo_1p p99 ms at 50% of max"]["ceiling_at_same_rate"] == bounds.get(subject_rate)
    assert rows["alo_1p / ceiling"]["ceiling_at_same_rate"] is None
    assert written["rss"]["users"] == Plan.smoke().rss_users
    assert written["rss"]["outputs"] == Plan.smoke().rss_users
    assert len(written["sweep"]["batch_size"]) == len(Plan.smoke().batch_sizes)
    for name in (PLOT_LATENCY, PLOT_SWEEP):
        assert (run_dir / name).read_bytes().startswith(b"\x89PNG")
    assert "run_pipeline" in (run_dir / PROFILE).read_text()
    report = (run_dir / "report.md").read_text()
    assert "| streamscore_alo_1p |" in report and PLOT_LATENCY in report
    assert "## Stages (streamscore_alo_1p" in report
    # Every phase left the broker as it found it: no topic of this run remains.
    topics = admin_client(kafka_settings.kafka).list_topics(timeout=30).topics
    assert [name for name in topics if results["run"] in name] == []
    # The run's outputs (results, report, process logs, profile) hold none of the events'
    # personal values: the generator's IPs, device ids, card fingerprints and user agents.
    personal = re.compile(
        rb"\b(?:10|203)\.\d{1,3}\.\d{1,3}\.\d{1,3}\b"  # the generator's IPs
        rb"|\bd\d{6}-\d+\b|\b[xn][0-9a-f]{10}\b"  # device ids (a user's, a new one)
        rb"|\b[0-9a-f]{16}\d{7}\b"  # card fingerprints
        + b"|"
        + b"|".join(re.escape(agent.encode()) for agent in USER_AGENTS.values())
    )
    for name in ("ip", "device_id", "user_agent"):  # the patterns find what they look for
        sample = [e[name] for e, _ in generate(GeneratorConfig(events=200, users=20))]
        assert all(personal.search(value.encode()) for value in sample), name
    cards = [e["card_fingerprint"] for e, _ in generate(GeneratorConfig(events=2000, users=20))]
    assert all(personal.search(card.encode()) for card in cards if card)
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    assert any(path.suffix == ".log" for path in files), files
    for path in files:
        found = personal.search(path.read_bytes())
        assert found is None, f"{path.relative_to(run_dir)} holds {found.group()!r}"

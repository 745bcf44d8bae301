"""`streamscore soak`, short, against the real broker: a live stream with malformed input
sent on purpose passes its checks, and the run leaves its plot and no topic behind.
"""

import json

import pytest
from rich.console import Console

from pipeline.kafka.admin import admin_client
from pipeline.tools.soak import PLOT, SoakPlan, run_soak

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_short_soak_accounts_for_every_input_and_cleans_up(kafka_settings, tmp_path):
    plan = SoakPlan(seconds=12, rate=300, users=150, malformed_every=100, sample_s=1.0)
    summary = run_soak(kafka_settings, plan, Console(quiet=True), out_dir=tmp_path)
    assert summary["passed"], summary["checks"]
    figures = summary["figures"]
    assert figures["events_sent"] == plan.events
    assert figures["dead_lettered"] == figures["malformed_sent"] == plan.events // 100
    assert all(reason.startswith("decode.") for reason in summary["dead_letter_reasons"])
    assert len(summary["samples"]) >= 10
    run_dir = tmp_path / summary["run"]
    assert json.loads((run_dir / "summary.json").read_text())["passed"]
    assert (run_dir / PLOT).read_bytes().startswith(b"\x89PNG")
    topics = admin_client(kafka_settings.kafka).list_topics(timeout=30).topics
    assert [name for name in topics if summary["run"] in name] == []

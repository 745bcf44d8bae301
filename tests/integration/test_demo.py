"""`streamscore demo` end to end, small: the summary's invariants hold."""

import json

import pytest
from rich.console import Console

import schemas
from pipeline.kafka.clients import reading_catalog
from pipeline.tools import demo
from schemas.codec import DecodeError, Decoder
from tests.integration.test_privacy import raw_records

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_summary_accounts_for_every_event(registry_settings, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_DIR", tmp_path / "demo")
    summary = demo.run_demo(
        registry_settings, events=3000, rate=3000, users=100, console=Console(quiet=True)
    )
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert summary["events_in"] == 3000 + 3000 // demo.MALFORMED_EVERY
    assert summary["events_in"] == summary["fraud_scores"] + summary["dead_lettered"]
    assert summary["recommendations"] == summary["events_with_candidates"] > 0
    assert summary["dead_lettered"] == 3
    for key in ("throughput_eps", "latency_p50_ms", "latency_p99_ms", "fraud_pr_auc"):
        assert summary[key] is not None and summary[key] > 0
    registry = summary["schema_registry"]
    assert registry["url"] == registry_settings.schema_registry.url
    topics = summary["topics"]
    assert set(registry["subjects"]) == {f"{topic}-value" for topic in topics.values()}
    assert all(v["id"] > 0 for versions in registry["subjects"].values() for v in versions)

    # The demo's outputs (summary, pipeline log, stats) hold none of the events' personal
    # values; gather them from the input topic as it was produced.
    decoder = Decoder(schemas.CLICK_EVENT, reading_catalog(registry_settings.schema_registry))
    personal: set[bytes] = set()
    for _, value, _ in raw_records(registry_settings, topics["input"]):
        try:
            event = decoder.decode(value)
        except DecodeError:
            continue  # the malformed messages the demo sends on purpose
        for name in ("ip", "device_id", "card_fingerprint", "user_agent"):
            if event[name]:
                personal.add(event[name].encode())
    assert len(personal) > 100
    files = [path for path in (tmp_path / "demo").rglob("*") if path.is_file()]
    assert any(path.suffix == ".log" for path in files), files
    for path in files:
        data = path.read_bytes()
        leaked = [value for value in personal if value in data]
        assert not leaked, f"{path.name} holds {leaked[:3]}"

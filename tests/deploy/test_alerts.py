"""The alert rules under deploy/prometheus: valid, passing their promtool unit tests, and
querying only metrics that streamscore exports.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.monitor.service import MonitorTelemetry
from pipeline.telemetry import Telemetry

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL_HOME = Path(__file__).resolve().parents[2] / "var" / "tools" / "promtool"


@pytest.fixture(scope="module")
def promtool():
    found = PROMTOOL_HOME if PROMTOOL_HOME.is_file() else shutil.which("promtool")
    assert found, "promtool is missing: `make promtool` unpacks it from Debian's package"
    return str(found)


def run(promtool, *args):
    done = subprocess.run(
        [promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_rules_and_config_are_valid(promtool):
    assert "SUCCESS: 6 rules found" in run(promtool, "check", "rules", "alerts.yml")
    run(promtool, "check", "config", "--syntax-only", "prometheus.yml")


def test_every_alert_passes_its_unit_tests(promtool):
    assert "SUCCESS" in run(promtool, "test", "rules", "alerts_test.yml")


def test_every_alert_is_unit_tested():
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == alerts


def test_alerts_query_only_metrics_streamscore_exports():
    families = {
        metric.name
        for registry in (Telemetry().registry, MonitorTelemetry(60).registry)
        for metric in registry.collect()
    }
    exported = {family + suffix for family in families for suffix in ("", "_total")}
    text = (PROMETHEUS / "alerts.yml").read_text()
    used = set(re.findall(r"streamscore_[a-z_]+", text))
    assert used and used <= exported, used - exported

import json

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.training.evaluate import evaluate

METRICS = {"ndcg_at_10", "hitrate_at_10", "mrr"}


def test_report_has_the_documented_keys_and_plots(model_dir, tmp_path):
    report = evaluate(model_dir, tmp_path, events=6000, users=120)
    assert {"pr_auc", "roc_auc", "recall_at_1pct_fpr", "brier"} <= set(report["fraud"])
    assert set(report["ranking"]) >= METRICS
    for baseline in ("popularity", "random"):
        assert set(report["ranking"]["baselines"][baseline]) >= METRICS
    for name in ("fraud_pr_curve.png", "fraud_calibration.png", "ranking_vs_baselines.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Even a two-epoch model beats a random ranking on unseen users.
    assert report["ranking"]["ndcg_at_10"] > report["ranking"]["baselines"]["random"]["ndcg_at_10"]


def test_cli_json_prints_one_object(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMSCORE_ENGINE__MODEL_DIR", str(model_dir))
    result = CliRunner().invoke(
        app, ["evaluate", "--json", "--events", "4000", "--users", "80", "--out-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) >= {"fraud", "ranking"}

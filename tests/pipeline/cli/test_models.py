"""The model commands' checks (training itself runs in the fixtures and integration tests)."""

from typer.testing import CliRunner

from pipeline.cli import app


def test_promote_refuses_a_version_that_is_not_a_challenger(monkeypatch, model_dir, tmp_path):
    import json
    import shutil

    from engines.registry import MANIFEST, resolve
    from tests.engines.publish import publish_copy

    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    monkeypatch.setenv("STREAMSCORE_ENGINE__MODEL_DIR", str(models))
    champion = resolve(models, "fraud").version
    result = CliRunner().invoke(app, ["promote", "--version", champion])
    assert result.exit_code == 1 and "not a challenger" in result.output

    challenger = publish_copy(models, "fraud")
    path = models / "fraud" / challenger / MANIFEST
    path.write_text(json.dumps(json.loads(path.read_text()) | {"role": "challenger"}))
    assert resolve(models, "fraud").version == champion
    result = CliRunner().invoke(app, ["promote", "--version", challenger, "--reason", "test"])
    assert result.exit_code == 0, result.output
    assert resolve(models, "fraud").version == challenger
    assert resolve(models, "fraud").manifest["promotion"]["reason"] == "test"

"""The command line's start-up checks (the commands themselves run in the integration tests)."""

from typer.testing import CliRunner

from pipeline.cli import app


def test_run_refuses_to_start_without_a_pseudonym_key_and_names_the_setting(monkeypatch):
    monkeypatch.delenv("STREAMSCORE_PRIVACY__PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("STREAMSCORE_PRIVACY", raising=False)
    monkeypatch.delenv("STREAMSCORE_CONFIG", raising=False)
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 2
    assert "privacy.pseudonym_key: not set" in result.output


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

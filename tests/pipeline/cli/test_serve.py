"""The production commands' start-up checks (they run in the integration tests)."""

from typer.testing import CliRunner

from pipeline.cli import app


def test_run_refuses_to_start_without_a_pseudonym_key_and_names_the_setting(monkeypatch):
    monkeypatch.delenv("STREAMSCORE_PRIVACY__PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("STREAMSCORE_PRIVACY", raising=False)
    monkeypatch.delenv("STREAMSCORE_CONFIG", raising=False)
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 2
    assert "privacy.pseudonym_key: not set" in result.output


def test_every_command_group_is_registered():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for command in (
        "kafka", "topics", "state", "engines", "registry", "schemas", "run", "warm", "monitor",
        "forget", "lag", "train", "retrain", "promote", "evaluate", "produce", "demo", "bench",
        "plan", "soak",
    ):  # fmt: skip
        assert f" {command} " in result.output, command

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

import pytest
from pydantic import ValidationError

from engines.settings import Backend
from pipeline.settings import SettingsError, load_settings, settings_env, with_local_key


def test_defaults_are_valid_and_frozen():
    settings = load_settings()
    assert settings.engine.backend is Backend.AUTO
    with pytest.raises(ValidationError):
        settings.consumer.max_batch = 5  # type: ignore[misc]


def test_precedence_arguments_over_environment_over_file(tmp_path, monkeypatch):
    config = tmp_path / "s.toml"
    config.write_text('[consumer]\nmax_batch = 10\nmax_wait_ms = 7\ngroup_id = "file"\n')
    monkeypatch.setenv("STREAMSCORE_CONSUMER__MAX_WAIT_MS", "9")
    monkeypatch.setenv("STREAMSCORE_CONSUMER__GROUP_ID", "env")
    settings = load_settings(config, consumer={"group_id": "arg"})
    assert (settings.consumer.max_batch, settings.consumer.max_wait_ms) == (10, 9)
    assert settings.consumer.group_id == "arg"


def test_kafka_bootstrap_servers_names_an_existing_cluster(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:29092")
    assert load_settings().kafka.bootstrap_servers == "broker:29092"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"consumer": {"max_batch": 0}}, "consumer.max_batch"),
        ({"decision": {"review_threshold": 0.95, "block_threshold": 0.9}}, "decision"),
        ({"engine": {"backend": "gpu-magic"}}, "engine.backend"),
        ({"consumer": {"no_such_setting": 1}}, "consumer.no_such_setting"),
        ({"monitor": {"report_interval_s": 60, "quality_window_s": 30}}, "report_interval_s"),
        ({"monitor": {"join_window_s": 0}}, "monitor.join_window_s"),
        ({"consumer": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 2001}}, "heartbeat"),
    ],
)
def test_errors_name_the_setting(overrides, named):
    with pytest.raises(SettingsError, match=named):
        load_settings(**overrides)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_secrets_do_not_render(monkeypatch):
    monkeypatch.setenv("STREAMSCORE_KAFKA__SASL_PASSWORD", "hunter2")
    settings = load_settings()
    assert "hunter2" not in repr(settings)
    assert settings.kafka.client_config()["sasl.password"] == "hunter2"


def test_settings_env_round_trips_through_a_child_environment(monkeypatch):

    settings = load_settings(
        topics={"input": "x"},
        engine={"model_dir": "/m"},
        kafka={"sasl_password": "pw", "extra": {"a.b": "1"}},
    )
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    again = load_settings()
    assert again.model_dump() == settings.model_dump()
    assert again.kafka.client_config()["sasl.password"] == "pw"


def test_the_password_can_come_from_a_mounted_file_but_not_from_two_places(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("from-a-file\n")
    settings = load_settings(kafka={"sasl_password_file": str(secret)})
    assert settings.kafka.client_config()["sasl.password"] == "from-a-file"
    assert "from-a-file" not in repr(settings)
    with pytest.raises(SettingsError, match="not both"):
        load_settings(kafka={"sasl_password_file": str(secret), "sasl_password": "x"})
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(kafka={"sasl_password_file": str(tmp_path / "missing")})


def test_the_registry_password_comes_from_a_file_and_never_shows(tmp_path, monkeypatch):
    secret = tmp_path / "registry-password"
    secret.write_text("registry-secret\n")
    settings = load_settings(
        schema_registry={
            "url": "https://registry.test/apis/ccompat/v7",
            "basic_auth_user": "streamscore",
            "basic_auth_password_file": str(secret),
            "ssl_ca_location": str(secret),
        }
    )
    config = settings.schema_registry.client_config()
    assert config["basic.auth.user.info"] == "streamscore:registry-secret"
    assert config["ssl.ca.location"] == str(secret) and config["timeout"] > 0
    assert "registry-secret" not in repr(settings)
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", "")
    assert not load_settings().schema_registry.enabled  # the static mode


@pytest.mark.parametrize(
    "registry",
    [
        {"url": "registry:8081"},
        {"url": "http://r", "basic_auth_user": "u"},
        {"url": "http://r", "basic_auth_password": "p"},
    ],
)
def test_a_bad_registry_setting_is_named(registry):
    with pytest.raises(SettingsError, match="schema_registry"):
        load_settings(schema_registry=registry)


def test_the_pseudonym_key_is_required_to_run_and_named_when_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("STREAMSCORE_PRIVACY__PSEUDONYM_KEY", raising=False)
    with pytest.raises(SettingsError, match=r"privacy\.pseudonym_key: not set"):
        load_settings().privacy.secret()
    with pytest.raises(SettingsError, match=r"privacy.pseudonym_key.*shorter than 16 bytes"):
        load_settings(privacy={"pseudonym_key": "short"})
    short_file = tmp_path / "short.key"
    short_file.write_text("short\n")
    with pytest.raises(SettingsError, match=r"privacy\.pseudonym_key_file: shorter than 16"):
        load_settings(privacy={"pseudonym_key_file": str(short_file)}).privacy.secret()
    with pytest.raises(SettingsError, match="not both"):
        load_settings(privacy={"pseudonym_key": "x" * 20, "pseudonym_key_file": str(short_file)})


def test_the_pseudonym_key_comes_from_the_environment_or_a_file_and_never_shows(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("STREAMSCORE_PRIVACY__PSEUDONYM_KEY", "key-from-the-environment")
    settings = load_settings()
    assert settings.privacy.secret() == b"key-from-the-environment"
    assert "key-from-the-environment" not in repr(settings) + str(settings.model_dump())
    for name, value in settings_env(settings).items():  # a child process gets it
        monkeypatch.setenv(name, value)
    assert load_settings().privacy.secret() == b"key-from-the-environment"
    monkeypatch.delenv("STREAMSCORE_PRIVACY", raising=False)
    monkeypatch.delenv("STREAMSCORE_PRIVACY__PSEUDONYM_KEY")
    key_file = tmp_path / "pseudonym.key"
    key_file.write_text("key-from-a-mounted-file\n")
    assert load_settings(privacy={"pseudonym_key_file": str(key_file)}).privacy.secret() == (
        b"key-from-a-mounted-file"
    )


def test_local_tools_generate_one_private_key_and_reuse_it(monkeypatch, tmp_path):
    monkeypatch.delenv("STREAMSCORE_PRIVACY__PSEUDONYM_KEY", raising=False)
    path = tmp_path / "privacy" / "pseudonym.key"
    first = with_local_key(load_settings(), path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(first.privacy.secret()) >= 32
    assert with_local_key(load_settings(), path).privacy.secret() == first.privacy.secret()
    configured = load_settings(privacy={"pseudonym_key": "configured-key-is-kept"})
    assert with_local_key(configured, path) is configured

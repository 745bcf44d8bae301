import pytest

from pipeline.tools.local_broker import BrokerError, LocalBroker, resolve_jars

pytestmark = pytest.mark.integration


def test_relative_libs_folder_is_filled_where_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    libs = resolve_jars(tmp_path.joinpath("x").relative_to(tmp_path))
    assert libs == tmp_path / "x"
    assert list(libs.glob("kafka_2.13-*.jar")) and list(libs.glob("log4j-slf4j-impl-*.jar"))
    assert resolve_jars(libs) == libs  # second call: cached, no Maven


def test_a_broker_that_cannot_start_says_why(tmp_path, kafka_bootstrap):
    port = int(kafka_bootstrap.rsplit(":", 1)[1])
    from pipeline.tools.local_broker import REPO_ROOT, free_port

    # The session broker already holds this port, so this one cannot listen.
    broker = LocalBroker(tmp_path, REPO_ROOT / "var" / "kafka" / "libs", port, free_port())
    with pytest.raises(BrokerError, match=r"did not answer.*the port is taken"):
        broker.up(timeout_s=60)  # at once: the broker there is another cluster
    assert broker.pid() is None

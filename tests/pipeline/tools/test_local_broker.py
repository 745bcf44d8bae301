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


def test_cluster_nodes_share_a_static_quorum_and_replicate_internal_topics(tmp_path):
    from pipeline.tools.local_broker import LocalCluster

    cluster = LocalCluster(tmp_path, tmp_path / "libs", (9100, 9102, 9104), (9101, 9103, 9105))
    assert cluster.bootstrap == "127.0.0.1:9100,127.0.0.1:9102,127.0.0.1:9104"
    for node in cluster.nodes:
        node.home.mkdir(parents=True)
        properties = dict(
            line.split("=", 1) for line in node._write_properties().read_text().splitlines()
        )
        assert properties["node.id"] == str(node.node_id)
        assert properties["controller.quorum.voters"] == (
            "1@127.0.0.1:9101,2@127.0.0.1:9103,3@127.0.0.1:9105"
        )
        assert "controller.quorum.bootstrap.servers" not in properties
        for key in (
            "default.replication.factor",
            "offsets.topic.replication.factor",
            "transaction.state.log.replication.factor",
        ):
            assert properties[key] == "3", key
        assert properties["min.insync.replicas"] == "2"
        assert properties["transaction.state.log.min.isr"] == "2"
    assert cluster.node(2).port == 9102


def test_a_single_broker_keeps_replication_one(tmp_path):
    broker = LocalBroker(tmp_path, tmp_path / "libs")
    properties = broker._write_properties().read_text()
    assert "offsets.topic.replication.factor=1\n" in properties
    assert "min.insync.replicas=1\n" in properties
    assert "controller.quorum.bootstrap.servers=127.0.0.1:9093\n" in properties

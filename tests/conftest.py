"""Shared fixtures: a real Kafka broker for the session, tiny trained models, fresh topics."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.settings import Settings, load_settings
from pipeline.tools.local_broker import REPO_ROOT, LocalBroker, LocalCluster, free_port
from pipeline.tools.local_registry import LocalRegistry
from pipeline.topics import create_topics
from pipeline.training.train import TrainConfig, train_all

TINY_TRAINING = TrainConfig(events=20_000, users=300, max_epochs=2, seed=3)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker | None]:
    """The session's local broker on free ports; None when KAFKA_BOOTSTRAP_SERVERS is set."""
    if _external_bootstrap():
        yield None
        return
    broker = LocalBroker(
        home=tmp_path_factory.mktemp("kafka"),
        libs=REPO_ROOT / "var" / "kafka" / "libs",
        port=free_port(),
        controller_port=free_port(),
    )
    broker.up()
    yield broker
    broker.down(purge=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: LocalBroker | None) -> str:
    """KAFKA_BOOTSTRAP_SERVERS when set, otherwise the local broker's address."""
    return _external_bootstrap() or kafka_broker.bootstrap  # type: ignore[union-attr]


def _external_bootstrap() -> str | None:
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get("BROKERS") or None


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small but really trained fraud and ranking models."""
    directory = tmp_path_factory.mktemp("models")
    train_all(directory, TINY_TRAINING, lambda *_: None)
    return directory


@pytest.fixture
def kafka_settings(kafka_bootstrap: str, model_dir: Path, tmp_path: Path) -> Settings:
    """Settings on fresh, uuid-named topics and group, with the topics created; partitions
    given up cleanly leave snapshots in the test's own directory.
    """
    settings = fresh_settings(kafka_bootstrap, model_dir, tmp_path)
    create_topics(settings)
    return settings


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three local KRaft nodes replicating each other (RF 3, min ISR 2), started only for
    the tests that fault brokers. Always local: such a test stops and kills its nodes.
    """
    cluster = LocalCluster(
        home=tmp_path_factory.mktemp("cluster"),
        libs=REPO_ROOT / "var" / "kafka" / "libs",
        ports=tuple(free_port() for _ in range(3)),
        controller_ports=tuple(free_port() for _ in range(3)),
    )
    cluster.up()
    yield cluster
    cluster.down(purge=True)


@pytest.fixture
def cluster_settings(kafka_cluster: LocalCluster, model_dir: Path, tmp_path: Path) -> Settings:
    """`kafka_settings` on the 3-node cluster: fresh topics with replication factor 3."""
    settings = fresh_settings(kafka_cluster.bootstrap, model_dir, tmp_path, replication=3)
    create_topics(settings)
    return settings


def fresh_settings(
    bootstrap: str, model_dir: Path, tmp_path: Path, replication: int = 1
) -> Settings:
    """Settings on fresh, uuid-named topics and group (not created)."""
    run = uuid.uuid4().hex[:10]
    return load_settings(
        kafka={"bootstrap_servers": bootstrap},
        topics={
            "input": f"t-{run}.in",
            "fraud_scores": f"t-{run}.fraud",
            "shadow_scores": f"t-{run}.shadow",
            "recommendations": f"t-{run}.recs",
            "dead_letter": f"t-{run}.dlq",
            "labels": f"t-{run}.labels",
            "forget": f"t-{run}.forget",
            "input_histograms": f"t-{run}.input-histograms",
            "model_quality": f"t-{run}.quality",
            "partitions": 3,
            "replication_factor": replication,
        },
        consumer={"group_id": f"g-{run}"},
        monitor={"group_id": f"m-{run}"},
        checkpoint={"interval_ms": 200},
        features={"snapshot_dir": str(tmp_path / "snapshots")},
        engine={"model_dir": str(model_dir), "backend": "onnxruntime"},
        telemetry={"port": 0},  # tests that probe it choose a free port
        schema_registry={"url": ""},  # static ids; the registry's tests use registry_settings
        privacy={"pseudonym_key": secrets.token_urlsafe(32)},  # generated, as in the demo
    )


@pytest.fixture(scope="session")
def schema_registry(
    tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str
) -> Iterator[LocalRegistry | None]:
    """The session's Apicurio registry on free ports, storing into the session's broker;
    None when SCHEMA_REGISTRY_URL names an existing one.
    """
    if os.environ.get("SCHEMA_REGISTRY_URL"):
        yield None
        return
    registry = LocalRegistry(
        home=tmp_path_factory.mktemp("registry"),
        app_home=REPO_ROOT / "var" / "registry" / "app",
        bootstrap=kafka_bootstrap,
        port=free_port(),
        management_port=free_port(),
        journal_topic=f"_apicurio.journal.{uuid.uuid4().hex[:8]}",
    )
    registry.up()
    yield registry
    registry.down()


@pytest.fixture
def registry_settings(kafka_settings: Settings, schema_registry: LocalRegistry | None) -> Settings:
    """`kafka_settings` with the registry: SCHEMA_REGISTRY_URL or the session's. Short
    timeouts and backoff, so that an outage is seen and outlived quickly.
    """
    url = os.environ.get("SCHEMA_REGISTRY_URL") or schema_registry.url  # type: ignore[union-attr]
    registry = kafka_settings.schema_registry.model_copy(
        update={"url": url, "timeout_s": 2.0, "retry_backoff_s": 0.5, "retry_backoff_max_s": 2.0}
    )
    return kafka_settings.model_copy(update={"schema_registry": registry})

"""A real Apache Kafka broker on loopback, resolved from Maven Central and run in KRaft mode.

`streamscore kafka up|down|status` and the test fixtures use LocalBroker: jars come from
`deploy/kafka/pom.xml` into a cached folder, storage is formatted once, and one combined
broker+controller listens on 127.0.0.1. `LocalCluster` runs several such nodes as one
replicated cluster (`kafka up --brokers 3`): a static controller quorum of all of them,
storage formatted with one cluster id, internal topics with replication factor 3 and
`min.insync.replicas` 2.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.admin import AdminClient

from schemas.errors import StreamscoreError

REPO_ROOT = Path(__file__).resolve().parents[2]
POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
LOG4J_CONFIG = REPO_ROOT / "deploy" / "kafka" / "log4j2.properties"
JVM_OPTIONS = ["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]


class BrokerError(StreamscoreError, RuntimeError):
    """The local broker could not be resolved, started or reached."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def resolve_jars(libs: Path) -> Path:
    """Copy the broker's runtime jars into `libs` with Maven, once per pom version."""
    libs = libs.resolve()  # Maven resolves a relative output folder against the pom's folder
    stamp = libs / ".pom-sha256"
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest and list(libs.glob("kafka_2.13-*.jar")):
        return libs
    if shutil.which("mvn") is None:
        raise BrokerError("Maven (mvn) is needed to fetch the Kafka broker jars")
    shutil.rmtree(libs, ignore_errors=True)
    libs.mkdir(parents=True)
    command = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={libs}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BrokerError(f"mvn failed to resolve Kafka jars:\n{result.stdout}\n{result.stderr}")
    if not list(libs.glob("kafka_2.13-*.jar")):
        raise BrokerError(f"mvn succeeded but put no Kafka broker jar in {libs}")
    stamp.write_text(digest)
    return libs


@dataclass(frozen=True, slots=True)
class SaslSslListener:
    """A SASL_SSL client listener: SCRAM users created at storage format time, and a PEM
    keystore (unencrypted PKCS#8 key followed by the certificate chain).
    """

    port: int
    keystore_pem: Path
    users: tuple[tuple[str, str], ...]  # (name, password)
    mechanism: str = "SCRAM-SHA-512"


@dataclass(frozen=True, slots=True)
class LocalBroker:
    """One KRaft node whose files live under `home`."""

    home: Path
    libs: Path
    port: int = 9092
    controller_port: int = 9093
    sasl_ssl: SaslSslListener | None = None
    node_id: int = 1
    # A cluster's static quorum, `id@host:port,...` (`controller.quorum.voters`); None: this
    # node is a standalone controller.
    voters: str | None = None
    replication: int = 1  # of the internal topics, and the cluster's default for new ones

    @property
    def bootstrap(self) -> str:
        """The PLAINTEXT bootstrap address."""
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        """Where the broker keeps its logs (topic data)."""
        return self.home / "data"

    @property
    def pid_file(self) -> Path:
        """The running broker's process id."""
        return self.home / "broker.pid"

    def up(self, timeout_s: float = 90.0) -> str:
        """Resolve, format if new, start, and wait until it answers; return the bootstrap."""
        if self.pid() is not None and self.ready(timeout_s=5):
            return self.bootstrap
        resolve_jars(self.libs)
        self.start()
        why = self._not_ready(timeout_s)
        if why is not None:
            tail = self._log_tail()
            self.down()
            raise BrokerError(f"broker did not answer on {self.bootstrap}: {why}:\n{tail}")
        return self.bootstrap

    def start(self, cluster: str | None = None) -> None:
        """Write its properties, format its storage if new (with the cluster id `cluster`,
        or a new one), and start its process without waiting for it.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        properties = self._write_properties()
        if not (self.data_dir / "meta.properties").is_file():
            self._format(properties, cluster)
        self._start(properties)

    def signal(self, signum: int) -> bool:
        """Send `signum` to its process (a fault test's kill -9, SIGSTOP, SIGCONT); whether
        it was running.
        """
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signum)
        return True

    def down(self, purge: bool = False, timeout_s: float = 30.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL); `purge` also deletes its data."""
        pid = self.pid()
        if pid is not None:
            terminate(pid, timeout_s)
            self.pid_file.unlink(missing_ok=True)
        if purge:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def pid(self) -> int | None:
        """The broker's pid when its process is alive."""
        return running_pid(self.pid_file)

    def ready(self, timeout_s: float) -> bool:
        """Poll until this broker (its process alive, its cluster id) answers, or time out.

        Checking the cluster id keeps another broker on the same port from passing for ours.
        """
        return self._not_ready(timeout_s) is None

    def _not_ready(self, timeout_s: float) -> str | None:
        """`ready`, saying why not: None once it answers. Another cluster answering on our
        port ends the wait at once: ours cannot listen there.
        """
        expected = self._cluster_id()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pid() is None:
                return "its process exited"
            remaining = max(0.5, deadline - time.monotonic())
            found = cluster_id(self.bootstrap, min(remaining, 3.0))
            if found == expected:
                return None
            if found is not None:
                return f"another cluster ({found}) answers there: the port is taken"
            time.sleep(0.3)
        return f"no answer in {timeout_s}s"

    def _cluster_id(self) -> str | None:
        meta = self.data_dir / "meta.properties"
        if not meta.is_file():
            return None
        for line in meta.read_text().splitlines():
            if line.startswith("cluster.id="):
                return line.removeprefix("cluster.id=").strip()
        return None

    def _write_properties(self) -> Path:
        listeners = (
            f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
        )
        protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        secure: dict[str, str] = {}
        if self.sasl_ssl is not None:
            listener = self.sasl_ssl
            listeners += f",SASL_SSL://127.0.0.1:{listener.port}"
            protocols += ",SASL_SSL:SASL_SSL"
            mechanism = listener.mechanism.lower()
            secure = {
                "sasl.enabled.mechanisms": listener.mechanism,
                f"listener.name.sasl_ssl.{mechanism}.sasl.jaas.config": (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                ),
                "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
                "listener.name.sasl_ssl.ssl.keystore.location": str(listener.keystore_pem),
            }
        quorum = (
            {"controller.quorum.voters": self.voters}
            if self.voters is not None
            else {"controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}"}
        )
        replicas = str(self.replication)
        min_isr = str(min(2, self.replication))  # one replica may be down, none lost
        properties = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            **quorum,
            "listeners": listeners,
            "advertised.listeners": listeners,
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": protocols,
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "4",
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
        } | secure
        path = self.home / "server.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
        return path

    def _java(self, main: str, *args: str) -> list[str]:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return [
            "java",
            *JVM_OPTIONS,
            f"-Dkafka.logs.dir={logs}",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def _format(self, properties: Path, cluster: str | None = None) -> None:
        cluster_id = cluster or new_cluster_id(self.libs)
        # A static quorum (`controller.quorum.voters`) is formatted without --standalone.
        standalone = ["--standalone"] if self.voters is None else []
        result = subprocess.run(
            self._java(
                "kafka.tools.StorageTool",
                "format",
                *standalone,
                "-t",
                cluster_id,
                "-c",
                str(properties),
                *self._scram_arguments(),
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise BrokerError(f"formatting KRaft storage failed:\n{result.stdout}\n{result.stderr}")

    def _scram_arguments(self) -> list[str]:
        """`--add-scram` per user: KRaft stores SCRAM credentials from format time on."""
        if self.sasl_ssl is None:
            return []
        mechanism = self.sasl_ssl.mechanism
        arguments = []
        for name, password in self.sasl_ssl.users:
            arguments += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        return arguments

    def _start(self, properties: Path) -> None:
        stdout = (self.home / "logs" / "stdout.log").open("ab")
        process = subprocess.Popen(
            self._java("kafka.Kafka", str(properties)),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid_file.write_text(str(process.pid))

    def _log_tail(self) -> str:
        for name in ("server.log", "stdout.log"):
            path = self.home / "logs" / name
            if path.is_file():
                return "\n".join(path.read_text(errors="replace").splitlines()[-30:])
        return "(no broker log)"


def new_cluster_id(libs: Path) -> str:
    """A fresh KRaft cluster id from Kafka's own StorageTool."""
    result = subprocess.run(
        ["java", "-cp", f"{libs}/*", "kafka.tools.StorageTool", "random-uuid"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


@dataclass(frozen=True, slots=True)
class LocalCluster:
    """Combined broker+controller nodes on loopback forming one replicated cluster: node
    `i` (from 1) lives under `home`/node-`i` on `ports[i-1]`, its controller on
    `controller_ports[i-1]`. With three nodes, internal topics have replication factor 3
    and min ISR 2, and so do new topics by default.
    """

    home: Path
    libs: Path
    ports: tuple[int, ...]
    controller_ports: tuple[int, ...]

    @property
    def nodes(self) -> list[LocalBroker]:
        """Every node, by node id (from 1)."""
        voters = ",".join(
            f"{i}@127.0.0.1:{port}" for i, port in enumerate(self.controller_ports, start=1)
        )
        return [
            LocalBroker(
                self.home / f"node-{i}",
                self.libs,
                port=port,
                controller_port=controller,
                node_id=i,
                voters=voters,
                replication=min(3, len(self.ports)),
            )
            for i, (port, controller) in enumerate(
                zip(self.ports, self.controller_ports, strict=True), start=1
            )
        ]

    def node(self, node_id: int) -> LocalBroker:
        """The node with this id."""
        return self.nodes[node_id - 1]

    @property
    def bootstrap(self) -> str:
        """Every node's PLAINTEXT address."""
        return ",".join(node.bootstrap for node in self.nodes)

    def up(self, timeout_s: float = 120.0) -> str:
        """Resolve the jars, format new nodes with one cluster id, start those not
        running, and wait until each answers; return the bootstrap.
        """
        resolve_jars(self.libs)
        nodes = self.nodes
        formatted = [n._cluster_id() for n in nodes if n._cluster_id() is not None]
        cluster = formatted[0] if formatted else new_cluster_id(self.libs)
        for node in nodes:
            if node.pid() is None:
                node.start(cluster)  # all before any wait: a node needs a quorum to serve
        deadline = time.monotonic() + timeout_s
        for node in nodes:
            why = node._not_ready(timeout_s)
            if why is not None:
                tail = node._log_tail()
                self.down()
                raise BrokerError(f"node {node.node_id} ({node.bootstrap}): {why}:\n{tail}")
        # A node answers before the controller has registered every broker: a topic with
        # replication factor 3 created then fails (INVALID_REPLICATION_FACTOR).
        registered = 0
        while time.monotonic() < deadline:
            registered = registered_brokers(self.bootstrap, timeout_s=3)
            if registered == len(nodes):
                return self.bootstrap
            time.sleep(0.3)
        self.down()
        raise BrokerError(f"{registered} of {len(nodes)} brokers registered in {timeout_s:.0f}s")

    def down(self, purge: bool = False) -> None:
        """Stop every node; `purge` also deletes their data."""
        for node in self.nodes:
            node.signal(signal.SIGCONT)  # a stopped node cannot handle SIGTERM
            node.down(purge=purge)

    def running(self) -> list[int]:
        """The ids of the nodes whose process is alive."""
        return [node.node_id for node in self.nodes if node.pid() is not None]


def registered_brokers(bootstrap: str, timeout_s: float) -> int:
    """How many brokers the cluster at `bootstrap` reports (0 when it does not answer)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        return len(admin.list_topics(timeout=timeout_s).brokers)
    except Exception:
        return 0


def cluster_id(bootstrap: str, timeout_s: float) -> str | None:
    """The cluster id the broker at `bootstrap` reports, or None when it does not answer."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        found: str | None = admin.list_topics(timeout=timeout_s).cluster_id
    except Exception:
        return None
    return found


def wait_until_ready(
    bootstrap: str, timeout_s: float, config: dict[str, str | int | float | bool] | None = None
) -> bool:
    """Poll an AdminClient until `list_topics` answers or `timeout_s` passes."""
    settings: dict[str, str | int | float | bool] = {"bootstrap.servers": bootstrap, "log_level": 0}
    admin = AdminClient(settings | (config or {}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=2)
            return True
        except Exception:
            time.sleep(0.3)
    return False


def running_pid(pid_file: Path) -> int | None:
    """The pid in `pid_file` when that process is alive (the local broker's and registry's)."""
    try:
        pid = int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child still answers kill(0); reap it
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished == 0
    except ChildProcessError:
        return True


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


def terminate(pid: int, timeout_s: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _wait_exit(pid, timeout_s):
        os.kill(pid, signal.SIGKILL)
        _wait_exit(pid, 5.0)

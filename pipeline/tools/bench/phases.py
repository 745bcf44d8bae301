"""The bench's phases: each configuration against the local broker, measured from outside.

One run generates its events once (one seed): a backlog written once to a shared topic, and
a pool of later events for the live phases. Each configuration then runs as its own
processes, in two phases:

- **throughput**: a fresh consumer group drains the backlog; the probe counts outputs as
  they become readable and the rate is taken between the 10th and 95th percentile of
  arrivals, so process start, group join and the tail are left out. CPU (all processes of
  the configuration, and the broker) is measured over the same window; peak RSS is VmHWM.
- **latency**: fresh processes on a fresh live topic; after they joined, events from the
  pool are produced at 25%, 50% and 75% of the measured maximum. Latency is from the input's
  Kafka timestamp (set when the bench produces it: the event's arrival) to the moment the
  probe, a read_committed consumer, reads its output.

The bench process itself (producer and probe) shares the two cores with the configuration
and the broker; its CPU share is reported beside theirs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from pipeline.kafka.admin import (
    admin_client,
    committed_offsets,
    delete_topics,
    end_offsets,
)
from pipeline.kafka.clients import producer_config
from pipeline.serve.counts import STAGES
from pipeline.settings import Settings, settings_env, with_local_key
from pipeline.tools.bench.probe import CpuMeter, Latency, Probe, check_alive, latency_of
from pipeline.tools.bench.workload import (
    BY_NAME,
    Config,
    Plan,
    Workload,
    distinct_users,
)
from pipeline.tools.loadgen import produce_one
from pipeline.topics import create_topics

ROOT = Path(__file__).resolve().parents[3]
PEER_VENV = ROOT / "var" / "bench" / "peer-venv"
# The peer's own environment: Quix Streams pins confluent-kafka 2.12, ours is newer.
PEER_REQUIREMENTS = (
    "quixstreams==3.28.1",
    "onnxruntime==1.32.0",
    "fastavro==1.13.1",
    "numpy>=2.0",
    "numba==0.68.1",  # imported with pipeline.serve.features (the peer uses its reference updater)
    "pydantic-settings>=2.7,<3",
    "structlog>=25.1",
)


@dataclass(slots=True)
class Throughput:
    """What the throughput phase of one configuration measured."""

    throughput_eps: float
    outputs: int
    window_s: float
    cpu_percent: float
    broker_cpu_percent: float
    bench_cpu_percent: float
    rss_mb: float
    stages_us: dict[str, float] | None = None  # µs per event per stage (streamscore only)
    stages_cpu_us: dict[str, float] | None = None  # the same, the loop thread's CPU alone


class Bench:
    """One bench run: topics, processes, probe and measurements for every configuration."""

    def __init__(self, settings: Settings, plan: Plan, run_dir: Path, say: Callable[[str], None]):
        """Run `plan` on the broker of `settings`, writing logs under `run_dir`."""
        self.plan = plan
        self.run_dir = run_dir
        self.say = say
        self.run_id = run_dir.name
        self.base = with_local_key(settings).model_copy(
            update={
                "topics": settings.topics.model_copy(update={"partitions": plan.partitions}),
                "telemetry": settings.telemetry.model_copy(update={"port": 0}),
                # The static catalog: every configuration (the peers too) frames and reads
                # the same bytes, as in earlier runs. With a registry the ids are looked up
                # once per process, so the hot path measured here is the same.
                "schema_registry": settings.schema_registry.model_copy(update={"url": ""}),
                "log_format": "json",
            }
        )
        self.backlog_topic = f"bench.{self.run_id}.backlog"
        self.rss_topic = f"bench.{self.run_id}.distinct-users"
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._workload = Workload([], [], 0.0)
        self._admin: AdminClient = admin_client(self.base.kafka)
        self._broker = _broker_process(self.base)

    # --- phases -------------------------------------------------------------------------

    def fill_backlog(self, workload: Workload) -> float:
        """Write the backlog once; every configuration reads these same bytes."""
        self._workload = workload
        create_topics(self.base, [self.backlog_topic])
        return produce_all(self.base, self.backlog_topic, workload.backlog)

    def throughput(
        self,
        config: Config,
        limit: int | None = None,
        tag: str = "throughput",
        overrides: dict[str, Any] | None = None,
        profile: Path | None = None,
    ) -> Throughput:
        """Drain the backlog (or its first `limit` events) and measure the rate."""
        expected = limit or self.plan.events
        # Several processes would join one after another and rebalance inside the window,
        # so they join an empty topic first and the same backlog bytes are written after.
        joined_first = config.processes > 1
        topic = f"bench.{self.run_id}.{config.name}.{tag}.in" if joined_first else None
        if topic is not None:
            create_topics(self.base, [topic])
        settings = self._settings(config, tag, topic or self.backlog_topic, overrides)
        with self._processes(config, settings, tag, profile) as procs:
            probe = Probe(settings, settings.topics.fraud_scores, timed=False)
            try:
                if topic is not None:
                    self._wait_joined(settings.consumer.group_id, config.processes, procs)
                    produce_all(self.base, topic, self._workload.backlog[:expected])
                window = probe.count_until(expected, self.plan.max_phase_s, procs, self._broker)
                meter = window.meter
                rss = sum(_peak_rss_mb(proc.pid) for proc in procs)
            finally:
                probe.close()
        return Throughput(
            stages_us=self.stages(config, tag),
            stages_cpu_us=self.stages(config, tag, cpu=True),
            throughput_eps=round(window.rate(), 1),
            outputs=window.count,
            window_s=round(window.seconds, 3),
            cpu_percent=round(meter.percent(), 1) if meter else 0.0,
            broker_cpu_percent=round(meter.broker_percent(), 1) if meter else 0.0,
            bench_cpu_percent=round(meter.self_percent(), 1) if meter else 0.0,
            rss_mb=round(rss, 1),
        )

    def latency(
        self,
        config: Config,
        max_eps: float,
        workload: Workload,
        rates: Sequence[float] | None = None,
    ) -> list[Latency]:
        """Offer events at each fraction of `max_eps` and each fixed rate of the plan (or at
        `rates` alone, as fixed rates) on a fresh topic and time the outputs.
        """
        live_topic = f"bench.{self.run_id}.{config.name}.live"
        create_topics(self.base, [live_topic])
        settings = self._settings(config, "latency", live_topic)
        results = []
        with self._processes(config, settings, "latency") as procs:
            self._wait_joined(settings.consumer.group_id, config.processes, procs)
            probe = Probe(
                settings,
                settings.topics.fraud_scores,
                timed=True,
                ceiling=config.kind == "ceiling",
                split=config.stamps_outputs,
            )
            # librdkafka's default linger (5 ms), as a shop's producer would have it: 1 ms
            # sent about five times as many requests, and the broker they wake shares the
            # two cores with what is measured (its CPU fell from 87% to 66-74% at
            # 10,000 events/s with this and the probe's fetch below).
            producer = Producer(producer_config(self.base.kafka) | {"linger.ms": 5})
            pool = _cycle(workload.live)
            try:
                # Warm-up, not measured: first batches pay for lazy allocations.
                warm_ms = math.floor(time.time() * 1000)
                warm_s = min(1.0, self.plan.live_s)
                warm, _ = offer(producer, live_topic, pool, max(max_eps * 0.1, 1.0), warm_s)
                warmed = probe.wait_for(warm_ms, math.ceil(time.time() * 1000), warm, 30.0, procs)
                if warmed < warm:
                    self.say(f"  {config.name}: {warmed} of {warm} warm-up outputs in 30 s")
                fractions = self.plan.rate_fractions if rates is None else ()
                points = [(f, max(max_eps * f, 1.0), False) for f in fractions]
                fixed_rates = self.plan.fixed_rates if rates is None else rates
                points += [(r / max_eps, r, True) for r in fixed_rates if r < max_eps]
                for fraction, rate, fixed in points:
                    self._wait_checkpointed(settings, live_topic, procs)
                    meter = CpuMeter([proc.pid for proc in procs], self._broker)
                    started_ms = math.floor(time.time() * 1000)  # Kafka: whole ms
                    sent, seconds = offer(producer, live_topic, pool, rate, self.plan.live_s)
                    ended_ms = math.ceil(time.time() * 1000)
                    meter.stop()
                    wait_s = 30.0 + self.plan.live_s
                    received = probe.wait_for(started_ms, ended_ms, sent, wait_s, procs)
                    if received < sent:  # reported as received < events, not raised
                        self.say(
                            f"  {config.name} at {fraction:.0%}: {received} of {sent} outputs "
                            f"on {settings.topics.fraud_scores} in {wait_s:.0f} s"
                        )
                    latencies, to_output = probe.split_between(started_ms, ended_ms)
                    point = latency_of(fraction, rate, sent, seconds, latencies, to_output, meter)
                    point.fixed = fixed
                    results.append(point)
                    self.say(
                        f"  {config.name} at {fraction:.0%} ({rate:,.0f}/s): "
                        f"p50 {results[-1].p50_ms} ms, p99 {results[-1].p99_ms} ms"
                    )
            finally:
                producer.flush(30)
                probe.close()
        return results

    def rss_with_users(self, workload: Workload) -> dict[str, Any]:
        """Peak RSS of one at-least-once process once `rss_users` distinct users are live."""
        users = self.plan.rss_users
        create_topics(self.base, [self.rss_topic])
        self.say(f"writing {users:,} events of distinct users")
        produce_all(self.base, self.rss_topic, distinct_users(workload, users))
        config = BY_NAME["streamscore_alo_1p"]
        settings = self._settings(config, "rss", self.rss_topic)
        settings = settings.model_copy(
            update={"features": settings.features.model_copy(update={"max_users": max(users, 1)})}
        )
        with self._processes(config, settings, "rss") as procs:
            probe = Probe(settings, settings.topics.fraud_scores, timed=False)
            try:
                window = probe.count_until(users, 1800.0, procs, self._broker)
                peak = _peak_rss_mb(procs[0].pid)
                now = psutil.Process(procs[0].pid).memory_info().rss / 2**20
            finally:
                probe.close()
        return {
            "users": users,
            "outputs": window.count,
            "peak_rss_mb": round(peak, 1),
            "rss_mb_after": round(now, 1),
            "throughput_eps": round(window.rate(), 1),
        }

    # --- processes ----------------------------------------------------------------------

    def _settings(
        self, config: Config, tag: str, input_topic: str, overrides: dict[str, Any] | None = None
    ) -> Settings:
        prefix = f"bench.{self.run_id}.{config.name}.{tag}"
        topics = self.base.topics.model_copy(
            update={
                "input": input_topic,
                "fraud_scores": f"{prefix}.fraud-scores",
                "recommendations": f"{prefix}.recommendations",
                "dead_letter": f"{prefix}.dlq",
            }
        )
        consumer = self.base.consumer.model_copy(
            update={"group_id": f"bench-{self.run_id}-{config.name}-{tag}"} | (overrides or {})
        )
        processing = self.base.processing.model_copy(update={"guarantee": config.guarantee})
        settings = self.base.model_copy(
            update={"topics": topics, "consumer": consumer, "processing": processing}
        )
        create_topics(settings, [topics.fraud_scores, topics.recommendations, topics.dead_letter])
        return settings

    @contextmanager
    def _processes(
        self, config: Config, settings: Settings, tag: str, profile: Path | None = None
    ) -> Iterator[list[subprocess.Popen[bytes]]]:
        procs = [
            self._spawn(config, settings, f"{config.name}.{tag}.{i}", profile)
            for i in range(config.processes)
        ]
        try:
            yield procs
        finally:
            _stop_all(procs)
            self._drop(settings)
        failed = [(i, proc.returncode) for i, proc in enumerate(procs) if proc.returncode != 0]
        if failed:
            raise RuntimeError(
                f"{config.name}.{tag}: processes {failed} (index, exit code) did not stop "
                f"cleanly; see {self.run_dir / 'logs'}"
            )

    def _drop(self, settings: Settings) -> None:
        """Delete a finished phase's own topics (outputs, a private input, and whatever its
        processes created under their group's name: changelogs, Quix's internal topics) and
        its group. Kept, a run's phases left about 70 topics of 12 partitions each on the
        broker, runs added up (12,000 partitions and 7.7 GB after a day), and the broker,
        and the figures with it, grew slower run by run.
        """
        group = settings.consumer.group_id
        created_by_group = re.compile(re.escape(group) + r"(?!\w)")
        topics = settings.topics
        own = {topics.fraud_scores, topics.recommendations, topics.dead_letter}
        if topics.input not in (self.backlog_topic, self.rss_topic):
            own.add(topics.input)
        existing = set(self._admin.list_topics(timeout=30).topics)
        own |= {name for name in existing if created_by_group.search(name)}
        delete_topics(self._admin, sorted(own & existing))
        for future in self._admin.delete_consumer_groups([group]).values():
            with contextlib.suppress(KafkaException):  # a group that never committed is not kept
                future.result()

    def close(self) -> None:
        """Delete the run's shared topics (the backlog, the distinct users)."""
        existing = set(self._admin.list_topics(timeout=30).topics)
        delete_topics(self._admin, sorted({self.backlog_topic, self.rss_topic} & existing))

    def _spawn(
        self, config: Config, settings: Settings, label: str, profile: Path | None
    ) -> subprocess.Popen[bytes]:
        env = os.environ | settings_env(settings) | {"PYTHONPATH": str(ROOT)}
        python = sys.executable
        if config.kind == "streamscore":
            argv = [python, "-m", "pipeline.cli", "run", "--stats-file", str(self._stats(label))]
            if profile is not None:
                argv += ["--profile", str(profile)]
        elif config.kind == "peer":
            argv = [
                str(ensure_peer_venv(self.say) / "bin" / "python"),
                "-m",
                "pipeline.tools.bench.peer_quix",
            ]
        else:
            argv = [python, "-m", "pipeline.tools.bench.baselines", config.kind]
        log = (self.run_dir / "logs" / f"{label}.log").open("wb")
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def _stats(self, label: str) -> Path:
        return self.run_dir / "stats" / f"{label}.json"

    def stages(self, config: Config, tag: str, cpu: bool = False) -> dict[str, float] | None:
        """µs per consumed event in each stage, over the processes of one finished phase
        (their `--stats-file`): wall time, or with `cpu` the loop thread's CPU time; None
        for a configuration that is not streamscore.
        """
        files = [self._stats(f"{config.name}.{tag}.{i}") for i in range(config.processes)]
        if config.kind != "streamscore" or not all(path.is_file() for path in files):
            return None
        runs = [json.loads(path.read_text()) for path in files]
        consumed = sum(run["consumed"] for run in runs)
        suffix = "_cpu_s" if cpu else "_s"
        return {
            stage: round(sum(run[f"{stage}{suffix}"] for run in runs) / max(consumed, 1) * 1e6, 2)
            for stage in STAGES
        }

    def _wait_checkpointed(
        self,
        settings: Settings,
        topic: str,
        procs: Sequence[subprocess.Popen[bytes]],
        timeout_s: float = 30.0,
    ) -> None:
        """Until the group of `settings` has committed everything offered on `topic`: a
        point starts once the one before (or the warm-up) has checkpointed, not while its
        last checkpoint (for streamscore, the changelog records of every user its last
        stretch changed) still shares the producer and the broker with the point's outputs.
        Measured with one process at 10,000 events/s just after the warm-up, leaving out
        each first run after a broker start (a cold broker): without this wait, 3 of 13 runs
        had the window's first outputs wait up to 0.55 s between the pipeline's produce call
        and the read (p99 247-297 ms); with it, none of 13 (p99 20.7-24.5 ms).
        """
        consumer = Consumer(
            self.base.kafka.client_config() | {"group.id": settings.consumer.group_id}
        )
        try:
            deadline = time.monotonic() + timeout_s
            ends = end_offsets(consumer, topic)
            while committed_offsets(consumer, topic, ends) != ends:
                if time.monotonic() >= deadline:
                    self.say(f"  {topic}: not all committed in {timeout_s:.0f} s; going on")
                    return
                check_alive(procs)
                time.sleep(0.05)
        finally:
            consumer.close()

    def _wait_joined(
        self, group: str, members: int, procs: Sequence[subprocess.Popen[bytes]]
    ) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            check_alive(procs)
            try:
                described = self._admin.describe_consumer_groups([group])[group].result()
            except KafkaException:
                described = None
            if described is not None:
                assigned = [m for m in described.members if m.assignment.topic_partitions]
                owned = sum(len(m.assignment.topic_partitions) for m in assigned)
                if len(assigned) >= members and owned >= self.plan.partitions:
                    time.sleep(self.plan.settle_s)
                    return
            time.sleep(0.3)
        raise TimeoutError(f"group {group} did not get {members} members in 180s")


def offer(
    producer: Producer,
    topic: str,
    pool: Iterator[tuple[bytes, bytes]],
    rate: float,
    seconds: float,
) -> tuple[int, float]:
    """Produce from `pool` at `rate` per second for `seconds`; return (sent, seconds taken).

    Paced in 1 ms steps: each step sends what is due, so the offered load is smooth.
    """
    started = time.monotonic()
    total = int(rate * seconds)
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - started) * rate) + 1)
        while sent < due:
            key, value = next(pool)
            produce_one(producer, topic, key, value)
            sent += 1
        producer.poll(0)
        time.sleep(0.001)
    return sent, time.monotonic() - started


def produce_all(
    settings: Settings,
    topic: str,
    messages: Iterator[tuple[bytes, bytes]] | list[tuple[bytes, bytes]],
) -> float:
    """Write `messages` to `topic` as fast as possible; return the seconds it took."""
    producer = Producer(producer_config(settings.kafka) | {"linger.ms": 20})
    started = time.monotonic()
    for key, value in messages:
        produce_one(producer, topic, key, value)
    if producer.flush(120):
        raise RuntimeError(f"bench events for {topic} were not all acknowledged")
    return time.monotonic() - started


def _cycle(messages: list[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
    while True:
        yield from messages


def _stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _peak_rss_mb(pid: int) -> float:
    # psutil has no peak RSS on Linux; the kernel keeps it as VmHWM.
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def _broker_process(settings: Settings) -> psutil.Process | None:
    """The local broker's process, found by the port it listens on; None when remote."""
    port = int(settings.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)[-1])
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return psutil.Process(conn.pid) if conn.pid else None
    except psutil.Error:  # other users' sockets can be off limits; report no broker CPU
        pass
    return None


def ensure_peer_venv(say: Callable[[str], None]) -> Path:
    """The peer's virtualenv, created once and reused while its requirements hold."""
    stamp = PEER_VENV / ".requirements"
    wanted = "\n".join(PEER_REQUIREMENTS)
    if stamp.is_file() and stamp.read_text() == wanted:
        return PEER_VENV
    say(f"creating the Quix Streams peer's virtualenv in {PEER_VENV} (first run only)")
    shutil.rmtree(PEER_VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(PEER_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *PEER_REQUIREMENTS], check=True)
    stamp.write_text(wanted)
    return PEER_VENV

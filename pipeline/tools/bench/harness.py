"""Runs every bench configuration against the local broker and measures it from outside.

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
import gc
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import psutil
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

import schemas
from pipeline.kafka.admin import (
    admin_client,
    committed_offsets,
    delete_topics,
    end_offsets,
    topic_partitions,
)
from pipeline.kafka.clients import producer_config
from pipeline.serve.decode import varint
from pipeline.serve.kernel import kernel
from pipeline.serve.records import join
from pipeline.settings import Settings, settings_env, with_local_key
from pipeline.tools.loadgen import produce_one
from pipeline.topics import create_topics
from pipeline.training.generator import ClickstreamGenerator, GeneratorConfig
from schemas.codec import Decoder, Encoder

Kind = Literal["ceiling", "naive", "peer", "streamscore"]
ROOT = Path(__file__).resolve().parents[3]
PEER_VENV = ROOT / "var" / "bench" / "peer-venv"
# The peer's own environment: Quix Streams pins confluent-kafka 2.12, ours is newer.
# The loop's stages as `RunStats` times them (`<stage>_s`).
STAGES = ("consume", "decode", "features", "score", "encode", "produce", "commit")
PEER_REQUIREMENTS = (
    "quixstreams==3.28.1",
    "onnxruntime==1.32.0",
    "fastavro==1.13.1",
    "numpy>=2.0",
    "numba==0.68.1",  # imported with pipeline.serve.features (the peer uses its reference updater)
    "pydantic-settings>=2.7,<3",
    "structlog>=25.1",
)


@dataclass(frozen=True, slots=True)
class Config:
    """One configuration under test."""

    name: str
    kind: Kind
    processes: int = 1
    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"

    @property
    def stamps_outputs(self) -> bool:
        """Whether its outputs get their own Kafka timestamp when produced: the ceiling's
        copy their input's, and Quix Streams gives an output its input's (measured: the
        split below read 0 ms for it).
        """
        return self.kind not in ("ceiling", "peer")


CONFIGS = (
    Config("ceiling", "ceiling"),
    Config("naive", "naive"),
    Config("peer_quix", "peer"),
    Config("streamscore_alo_1p", "streamscore"),
    Config("streamscore_alo_2p", "streamscore", processes=2),
    Config("streamscore_eos_1p", "streamscore", guarantee="exactly_once"),
    Config("streamscore_eos_2p", "streamscore", processes=2, guarantee="exactly_once"),
)
BY_NAME = {config.name: config for config in CONFIGS}


@dataclass(frozen=True, slots=True)
class Plan:
    """How much to run. `smoke()` is the tiny run `make test` does."""

    # A backlog that takes seconds to drain on a fast machine: 200,000 events drained in
    # 0.14-0.76 s on an AMD EPYC (20261127-235218), a window too short to time (two
    # processes read 1.19M events/s there, the ceiling 0.55-0.66M).
    events: int = 1_000_000
    users: int = 100_000  # ten events a user, as before
    seed: int = 7
    partitions: int = 12
    live_pool: int = 100_000
    live_s: float = 8.0
    rate_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    # Offered rates that do not move with max (events/s; skipped where above a max).
    fixed_rates: tuple[float, ...] = (10_000.0,)
    max_phase_s: float = 45.0
    repeats: int = 2  # throughput runs per configuration; the best one counts
    sweep_events: int = 300_000
    batch_sizes: tuple[int, ...] = (32, 128, 500, 2000, 4000)
    max_waits_ms: tuple[int, ...] = (1, 5, 20, 50)
    rss_users: int = 1_000_000
    # Once the group holds every partition, before events are offered: the last restore
    # and the first fetches settle.
    settle_s: float = 1.0
    extras: bool = True  # the batch/wait sweep, the profile and the memory phase
    configs: tuple[str, ...] = tuple(config.name for config in CONFIGS)

    @classmethod
    def smoke(cls) -> Plan:
        """Every configuration and phase, on a few thousand events."""
        return cls(
            events=3000,
            users=300,
            live_pool=3000,
            live_s=0.5,
            # The naive baseline would take about 27 s for the 3,000 events; streamscore's
            # take under 1 (the smoke test checks that they measured every one).
            max_phase_s=5.0,
            sweep_events=1500,
            batch_sizes=(64, 500),
            max_waits_ms=(5,),
            rss_users=3000,
            repeats=1,
            settle_s=0.2,
            fixed_rates=(300.0,),
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


@dataclass(slots=True)
class Latency:
    """Latency at one offered rate."""

    fraction: float
    offered_eps: float
    achieved_eps: float
    events: int
    received: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    # Of p99_ms, the part up to the output's own Kafka timestamp (the pipeline's produce
    # call): the rest is the output's way to a reader. NaN where outputs carry their
    # input's timestamp (`Config.stamps_outputs`).
    p99_to_output_ms: float
    cpu_percent: float  # the configuration's processes while the load was offered
    broker_cpu_percent: float
    bench_cpu_percent: float  # this process: the paced producer and the probe
    fixed: bool = False  # offered at one of `Plan.fixed_rates`, not a fraction of max


@dataclass(slots=True)
class Workload:
    """The generated events, as the bytes every configuration reads."""

    backlog: list[tuple[bytes, bytes]]
    live: list[tuple[bytes, bytes]]
    with_candidates: float
    digest: str = field(default="")


def generate(plan: Plan) -> Workload:
    """The run's events, encoded once: the backlog and then the live pool."""
    total = plan.events + plan.live_pool
    config = GeneratorConfig(events=total, users=plan.users, seed=plan.seed).anchored_before(
        time.time()
    )
    encoder = Encoder(schemas.CLICK_EVENT)
    messages: list[tuple[bytes, bytes]] = []
    candidates = 0
    for event, _ in ClickstreamGenerator(config):
        messages.append((event["user_id"].encode(), encoder.encode(event)))
        candidates += bool(event["candidates"])
    digest = hashlib.sha256()
    for key, value in messages:
        digest.update(key)
        digest.update(value)
    workload = Workload(
        messages[: plan.events], messages[plan.events :], candidates / total, digest.hexdigest()
    )
    # The events live until the run ends: out of the collector's sight, so that a full
    # collection walking them does not pause the probe and add to measured latency.
    gc.collect()
    gc.freeze()
    return workload


def distinct_users(workload: Workload, users: int) -> Iterator[tuple[bytes, bytes]]:
    """`users` events, one per distinct user: the backlog's events with fresh user ids."""
    decoder, encoder = Decoder(schemas.CLICK_EVENT), Encoder(schemas.CLICK_EVENT)
    templates = [decoder.decode(value) for _, value in workload.backlog[:10_000]]
    for i in range(users):
        event = dict(templates[i % len(templates)])
        event["user_id"] = f"rss-user-{i:08d}"
        event["event_id"] = f"rss-event-{i:08d}"
        yield event["user_id"].encode(), encoder.encode(event)


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
                    point = _latency(fraction, rate, sent, seconds, latencies, to_output, meter)
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
                _check_alive(procs)
                time.sleep(0.05)
        finally:
            consumer.close()

    def _wait_joined(
        self, group: str, members: int, procs: Sequence[subprocess.Popen[bytes]]
    ) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            _check_alive(procs)
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


# --- measurement ------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds of a set of processes, the broker and this process over a window."""

    def __init__(self, pids: Sequence[int], broker: psutil.Process | None) -> None:
        """Start measuring now."""
        self._procs = [psutil.Process(pid) for pid in pids]
        self._broker = broker
        self._self = psutil.Process()
        self._start = time.monotonic()
        self._cpu = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        def cpu(proc: psutil.Process | None) -> float:
            if proc is None:
                return 0.0
            try:
                times = proc.cpu_times()
            except psutil.Error:
                return 0.0
            return float(times.user + times.system)

        return sum(cpu(p) for p in self._procs), cpu(self._broker), cpu(self._self)

    def stop(self) -> None:
        """End the window."""
        end = self._sample()
        self._seconds = max(time.monotonic() - self._start, 1e-9)
        self._delta = tuple(b - a for a, b in zip(self._cpu, end, strict=True))

    def percent(self) -> float:
        """CPU of the measured processes, percent of one core (two busy cores: 200)."""
        return 100 * self._delta[0] / self._seconds

    def broker_percent(self) -> float:
        """CPU of the broker over the window."""
        return 100 * self._delta[1] / self._seconds

    def self_percent(self) -> float:
        """CPU of the bench process (producer and probe) over the window."""
        return 100 * self._delta[2] / self._seconds


@dataclass(slots=True)
class Window:
    """Arrival times of outputs; the steady rate between the 10th and 95th percentile."""

    arrivals: np.ndarray
    meter: CpuMeter | None

    @property
    def count(self) -> int:
        """Outputs read."""
        return len(self.arrivals)

    @property
    def seconds(self) -> float:
        """Length of the measured window."""
        lo, hi = self._bounds()
        return float(self.arrivals[hi] - self.arrivals[lo]) if hi > lo else 0.0

    def _bounds(self) -> tuple[int, int]:
        n = len(self.arrivals)
        return int(n * 0.10), max(int(n * 0.95) - 1, 0)

    def rate(self) -> float:
        """Outputs per second in the window."""
        lo, hi = self._bounds()
        seconds = self.seconds
        return (hi - lo) / seconds if seconds > 0 else 0.0


def ingest_times(values: list[bytes], decoder: Decoder) -> list[float]:
    """The `ingest_time` of each framed FraudScore in `values`: walked to by a kernel, or
    decoded (`decoder`) where the walk fails. fastavro took 10 µs a record, which at half
    the bench's maximum rate was a third of a core of the two the measured pipeline and
    the broker share; the walk and the join are under 1 µs.
    """
    buffer, starts, _ = join(values)
    found = np.empty(len(values), dtype=np.int64)
    walked = np.empty(len(values), dtype=np.bool_)
    _ingest_times(buffer, starts, found, walked)
    times = found.astype(np.float64)
    for i in np.flatnonzero(~walked).tolist():
        times[i] = float(decoder.decode(values[i])["ingest_time"])
    return times.tolist()


@kernel
def _skip_string(buf: np.ndarray, pos: int, end: int) -> int:
    """The position after the string at `pos`, or a negative one."""
    length, pos = varint(buf, pos, end)
    if pos < 0 or length < 0 or pos + length > end:
        return -1
    return int(pos + length)


@kernel
def _ingest_times(buf: np.ndarray, starts: np.ndarray, out: np.ndarray, ok: np.ndarray) -> None:
    """Into `out`, each record's `ingest_time`; `ok` is False where it is not a FraudScore
    of the schema the pipeline writes (schemas/fraud_score.avsc): event_id, user_id (strings),
    event_time (long), score (double), decision (enum), reasons (array of {string, double}),
    model_name, model_version (strings), then ingest_time (long).
    """
    for i in range(len(starts) - 1):
        ok[i] = False
        pos, end = starts[i] + 5, starts[i + 1]  # after the magic byte and the schema id
        if pos > end or buf[starts[i]] != 0:
            continue
        pos = _skip_string(buf, pos, end)
        if pos >= 0:
            pos = _skip_string(buf, pos, end)
        if pos >= 0:
            _, pos = varint(buf, pos, end)  # event_time
        if pos >= 0:
            pos = pos + 8 if pos + 8 <= end else -1  # score
        if pos >= 0:
            _, pos = varint(buf, pos, end)  # decision
        while pos >= 0:  # reasons: blocks of items, ended by a zero count
            count, pos = varint(buf, pos, end)
            if pos < 0 or count == 0:
                break
            if count < 0:  # a negative count is followed by the block's size in bytes
                count = -count
                _, pos = varint(buf, pos, end)
            for _ in range(count):
                if pos >= 0:
                    pos = _skip_string(buf, pos, end)
                if pos >= 0:
                    pos = pos + 8 if pos + 8 <= end else -1
        if pos >= 0:
            pos = _skip_string(buf, pos, end)
        if pos >= 0:
            pos = _skip_string(buf, pos, end)
        if pos >= 0:
            out[i], pos = varint(buf, pos, end)
            ok[i] = pos >= 0


class Probe:
    """A read_committed consumer of one output topic, assigned every partition from the start.

    Untimed, it counts arrivals; timed, a thread records (read time, input timestamp,
    output timestamp) for each, the input timestamp being the FraudScore's `ingest_time` or,
    for the ceiling's mirrored bytes, the Kafka timestamp it copied.
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        timed: bool,
        ceiling: bool = False,
        split: bool = False,
    ):
        """Read `topic` on the broker of `settings`; with `split`, the outputs' own Kafka
        timestamps say when they were produced.
        """
        self._consumer = Consumer(
            settings.kafka.client_config()
            | {
                "group.id": f"probe-{time.monotonic_ns()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                # At most one fetch per 5 ms, as the pipeline's consumer fetches: with the
                # default 1 byte a probe of a steady stream fetches once per round trip.
                "fetch.wait.max.ms": 5,
                "fetch.min.bytes": 65_536,
            }
        )
        self._topic = topic
        partitions = topic_partitions(self._consumer, topic, timeout_s=30)
        self._consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        self._ceiling = ceiling
        self._split = split
        self._decoder = Decoder(schemas.FRAUD_SCORE)
        self._read: list[float] = []
        self._ingest: list[float] = []
        self._produced: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timed:
            self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
            self._thread.start()

    def count_until(
        self,
        expected: int,
        max_s: float,
        procs: Sequence[subprocess.Popen[bytes]],
        broker: psutil.Process | None,
        start_timeout_s: float = 180,
    ) -> Window:
        """Read until `expected` outputs arrived, or `max_s` after the first one; CPU of
        `procs` and `broker` is metered from the first output on.
        """
        arrivals: list[float] = []
        meter: CpuMeter | None = None
        deadline = time.monotonic() + start_timeout_s
        while len(arrivals) < expected and time.monotonic() < deadline:
            messages = self._consumer.consume(1000, 0.005)
            now = time.monotonic()
            good = sum(1 for m in messages if m.error() is None)
            if good and not arrivals:
                meter = CpuMeter([proc.pid for proc in procs], broker)
                deadline = now + max_s
            arrivals.extend([now] * good)
            if not good:
                _check_alive(procs)
        if meter is not None:
            meter.stop()
        if not arrivals:
            raise TimeoutError(
                f"no output on {self._topic} in {start_timeout_s:.0f}s "
                f"({expected} expected); see the configuration's logs"
            )
        return Window(np.asarray(arrivals[:expected]), meter)

    def _run(self) -> None:
        while not self._stop.is_set():
            # consume() returns early only with a full batch: the timeout bounds the error.
            messages = self._consumer.consume(10_000, 0.001)
            now_ms = time.time() * 1000
            messages = [message for message in messages if message.error() is None]
            timestamps = [float(message.timestamp()[1]) for message in messages]
            if self._ceiling:  # it copied its input's
                ingest = timestamps
            else:
                values = [cast(bytes, message.value()) for message in messages]
                ingest = ingest_times(values, self._decoder)
            produced = timestamps if self._split else [math.nan] * len(messages)
            read = [now_ms] * len(messages)
            if read:
                with self._lock:
                    self._read.extend(read)
                    self._ingest.extend(ingest)
                    self._produced.extend(produced)

    def wait_for(
        self,
        start_ms: float,
        end_ms: float,
        count: int,
        timeout_s: float,
        procs: Sequence[subprocess.Popen[bytes]],
    ) -> int:
        """Wait until `count` outputs of inputs produced in [start_ms, end_ms] were read,
        checking that the processes live; return the number read, short after `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while (received := len(self.latencies_between(start_ms, end_ms))) < count:
            if time.monotonic() >= deadline:
                break
            _check_alive(procs)
            time.sleep(0.05)
        return received

    def latencies_between(self, start_ms: float, end_ms: float) -> np.ndarray:
        """Latency (ms) of outputs whose input was produced in [start_ms, end_ms]."""
        return self.split_between(start_ms, end_ms)[0]

    def split_between(self, start_ms: float, end_ms: float) -> tuple[np.ndarray, np.ndarray]:
        """For outputs whose input was produced in [start_ms, end_ms]: their latency (ms),
        and its part up to the output's own Kafka timestamp.
        """
        with self._lock:
            read = np.asarray(self._read)
            ingest = np.asarray(self._ingest)
            produced = np.asarray(self._produced)
        chosen = (ingest >= start_ms) & (ingest <= end_ms)
        return read[chosen] - ingest[chosen], produced[chosen] - ingest[chosen]

    def close(self) -> None:
        """Stop reading."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._consumer.close()


def _latency(
    fraction: float,
    rate: float,
    sent: int,
    seconds: float,
    latencies: np.ndarray,
    to_output: np.ndarray,
    meter: CpuMeter,
) -> Latency:
    def pct(q: float, values: np.ndarray = latencies) -> float:
        return round(float(np.percentile(values, q)), 2) if len(values) else float("nan")

    return Latency(
        fraction=fraction,
        offered_eps=round(rate, 1),
        achieved_eps=round(sent / max(seconds, 1e-9), 1),
        events=sent,
        received=len(latencies),
        p50_ms=pct(50),
        p95_ms=pct(95),
        p99_ms=pct(99),
        max_ms=round(float(latencies.max()), 2) if len(latencies) else float("nan"),
        p99_to_output_ms=pct(99, to_output),
        cpu_percent=round(meter.percent(), 1),
        broker_cpu_percent=round(meter.broker_percent(), 1),
        bench_cpu_percent=round(meter.self_percent(), 1),
    )


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


def _check_alive(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"a bench process exited early with {proc.returncode}; see logs")


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


def machine() -> dict[str, Any]:
    """Where the run happened: cores, CPU model, memory and versions."""
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import confluent_kafka

    versions = {
        name: metadata.version(name)
        for name in ("confluent-kafka", "fastavro", "onnxruntime", "torch", "numpy")
    }
    versions["librdkafka"] = confluent_kafka.libversion()[0]
    versions["quixstreams"] = PEER_REQUIREMENTS[0].split("==")[1]
    kafka_jar = next((ROOT / "var" / "kafka" / "libs").glob("kafka_*.jar"), None)
    versions["kafka"] = kafka_jar.stem.split("-", 1)[1] if kafka_jar else "unknown"
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }

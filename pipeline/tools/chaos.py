"""`streamscore chaos`: pipeline instances on a replicated cluster under a seeded schedule of
faults, then a verdict read back by read_committed consumers.

Three local KRaft nodes (`LocalCluster`), topics with replication factor 3 and min ISR 2,
`instances` `streamscore run` processes under exactly-once (or at-least-once) and a paced
producer on a thread. While it produces, the faults of the schedule are applied at their
times. The schedule comes from the seed, which is printed, so that a failing run replays:
the faults' kinds and order are fixed (`BROKER_FAULTS`, the schedule that found issue #48),
and the seed draws their targets and shifts their times by up to `JITTER_S`.

Targets are resolved when a fault is due: "the node leading most input partitions" is the
one that does at that moment. The verdict:

- every input event has exactly one FraudScore under exactly-once (at least one under
  at-least-once, the duplicates counted);
- no dead letter (the producer sends only valid events);
- no instance exited, and each stopped cleanly when asked at the end (a hung one does not);
- after the last fault was repaired, the group committed the end of the input within
  `catch_up_s`.

It writes summary.json to its run folder.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from rich.console import Console

import schemas
from pipeline.kafka.messages import read_messages
from pipeline.settings import Settings, with_local_key
from pipeline.tools.demo import RunningPipeline, ensure_models, fresh_topics
from pipeline.tools.loadgen import ProduceReport, produce_clickstream
from pipeline.tools.local_broker import REPO_ROOT, LocalCluster, free_port
from pipeline.tools.local_registry import http_ok
from pipeline.topics import create_topics, group_lag
from pipeline.training.generator import GeneratorConfig
from schemas.codec import Decoder

CHAOS_DIR = Path("var/chaos")
JITTER_S = 2.0  # how far the seed shifts each fault's time, either way
FaultKind = Literal[
    "kill_leader_node",  # kill -9 of the node leading most input partitions
    "kill_node",  # kill -9 of a node
    "restart_node",
    "stop_node",  # SIGSTOP
    "cont_node",  # SIGCONT
    "kill_instance",  # kill -9 of a pipeline instance
    "restart_instance",
]
# (seconds after production starts, kind, which target: "a" is the first node faulted, "b"
# and "c" the others in the seed's order; instances are drawn by the seed). Issue #48's.
BROKER_FAULTS: tuple[tuple[float, FaultKind, str], ...] = (
    (20, "kill_leader_node", "a"),
    (35, "restart_node", "a"),
    (50, "kill_instance", "i"),
    (60, "restart_instance", "i"),
    (75, "stop_node", "b"),
    (85, "cont_node", "b"),
    (100, "kill_node", "c"),
    (115, "restart_node", "c"),
)


@dataclass(frozen=True, slots=True)
class ChaosPlan:
    """What to run: the stream, the instances and the schedule's seed."""

    events: int = 180_000
    rate: float = 1500.0
    users: int = 20_000
    instances: int = 2
    partitions: int = 6
    guarantee: Literal["exactly_once", "at_least_once"] = "exactly_once"
    seed: int = 1
    catch_up_s: float = 60.0  # after the last repair, for the group to commit the input's end
    stop_timeout_s: float = 60.0  # for each instance to stop cleanly at the end


@dataclass(frozen=True, slots=True)
class Fault:
    """One step of the schedule, its target drawn from the seed."""

    at_s: float
    kind: FaultKind
    target: str  # a node slot ("a", "b", "c") or an instance index as text


@dataclass(slots=True)
class Applied:
    """A fault as it was applied."""

    at_s: float
    kind: str
    target: str  # "node 2", "instance 1"


@dataclass(slots=True)
class Verdict:
    """The checks, each with the figures it was decided on."""

    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every check held."""
        return all(self.checks.values())


def schedule(plan: ChaosPlan) -> list[Fault]:
    """`BROKER_FAULTS` with the seed's instance and times; node slots stay symbolic."""
    rng = random.Random(plan.seed)
    instance = str(rng.randrange(plan.instances))
    faults = []
    for at_s, kind, target in BROKER_FAULTS:
        jitter = rng.uniform(-JITTER_S, JITTER_S)
        faults.append(Fault(round(at_s + jitter, 1), kind, instance if target == "i" else target))
    # a repair never comes before its fault
    return sorted(faults, key=lambda f: (f.at_s, f.kind.startswith(("restart", "cont"))))


def judge(
    plan: ChaosPlan,
    sent: ProduceReport,
    input_ids: list[str],
    scored_ids: list[str],
    dead_letters: int,
    exits: dict[int, int | None],
    caught_up_s: float | None,
) -> Verdict:
    """Count inputs and outputs by event id; decide the run."""
    counts = Counter(scored_ids)
    wanted = set(input_ids)
    unscored = sum(1 for event in wanted if event not in counts)
    duplicated = sum(n - 1 for event, n in counts.items() if n > 1)
    unexpected = sum(1 for event in counts if event not in wanted)
    exactly = plan.guarantee == "exactly_once"
    verdict = Verdict()
    verdict.figures = {
        "events_sent": sent.events,
        "input_events": len(input_ids),
        "scored_events": len(wanted) - unscored,
        "unscored": unscored,
        "unscored_pct": round(100 * unscored / max(1, len(wanted)), 2),
        "duplicated_scores": duplicated,
        "scores_of_unknown_events": unexpected,
        "dead_letters": dead_letters,
        "instance_exit_codes": {str(k): v for k, v in exits.items()},
        "caught_up_after_last_repair_s": caught_up_s,
    }
    verdict.checks = {
        "every event written": len(input_ids) == sent.events,
        "every event scored": unscored == 0 and unexpected == 0,
        "no duplicated score" if exactly else "duplicates counted": not exactly or duplicated == 0,
        "no dead letter": dead_letters == 0,
        "every instance stopped cleanly": all(code == 0 for code in exits.values()),
        f"caught up within {plan.catch_up_s:.0f} s of the last repair": caught_up_s is not None,
    }
    return verdict


class Chaos:
    """One run: the cluster, the instances, the producer and the faults."""

    def __init__(
        self, settings: Settings, cluster: LocalCluster, plan: ChaosPlan, run_dir: Path
    ) -> None:
        """Nothing runs yet: `start_instance` starts each instance, `apply` each fault."""
        self.settings = settings
        self.cluster = cluster
        self.plan = plan
        self.run_dir = run_dir
        self.instances: dict[int, RunningPipeline] = {}
        self.ports: dict[int, int] = {}  # each instance's metrics and probes
        self.applied: list[Applied] = []
        self._nodes: dict[str, int] = {}  # node slot -> node id, fixed when first faulted
        self._rng = random.Random(plan.seed * 7919)

    def start_instance(self, index: int) -> None:
        """Start (or restart) instance `index` with its own metrics port and log."""
        self.ports[index] = free_port()
        telemetry = self.settings.telemetry.model_copy(update={"port": self.ports[index]})
        settings = self.settings.model_copy(update={"telemetry": telemetry})
        directory = self.run_dir / f"instance-{index}"
        if index in self.instances:  # keep the earlier life's log
            old = self.instances[index].log_path
            old.rename(old.with_suffix(f".{int(time.time())}.log"))
        self.instances[index] = RunningPipeline(settings, directory)

    def wait_ready(self, timeout_s: float) -> None:
        """Until every instance's /readyz answers 200 (engines loaded, group joined)."""
        deadline = time.monotonic() + timeout_s
        for index, instance in self.instances.items():
            url = f"http://127.0.0.1:{self.ports[index]}/readyz"
            while not http_ok(url):
                instance.check_running()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"instance {index} not ready in {timeout_s:.0f} s")
                time.sleep(0.5)

    def apply(self, fault: Fault, t_s: float) -> None:
        """Apply `fault` now; remember what it hit."""
        if fault.kind in ("kill_instance", "restart_instance"):
            index = int(fault.target)
            if fault.kind == "kill_instance":
                self.instances[index].kill()
            else:
                self.start_instance(index)
            self.applied.append(Applied(round(t_s, 1), fault.kind, f"instance {index}"))
            return
        node_id = self._node(fault)
        node = self.cluster.node(node_id)
        if fault.kind in ("kill_leader_node", "kill_node"):
            node.signal(signal.SIGKILL)
        elif fault.kind == "stop_node":
            node.signal(signal.SIGSTOP)
        elif fault.kind == "cont_node":
            node.signal(signal.SIGCONT)
        else:  # restart_node
            node.start()
        self.applied.append(Applied(round(t_s, 1), fault.kind, f"node {node_id}"))

    def _node(self, fault: Fault) -> int:
        """The node a slot names: "a" is the input's busiest leader when first faulted, the
        other slots the remaining nodes in the seed's order.
        """
        if fault.target not in self._nodes:
            nodes = [n.node_id for n in self.cluster.nodes]
            if fault.kind == "kill_leader_node":
                chosen = leading_most(self.cluster.bootstrap, self.settings.topics.input, nodes)
            else:
                free = [n for n in nodes if n not in self._nodes.values()]
                chosen = self._rng.choice(free)
            self._nodes[fault.target] = chosen
        return self._nodes[fault.target]


def leading_most(bootstrap: str, topic: str, nodes: list[int]) -> int:
    """The node that leads most partitions of `topic` now."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    metadata = admin.list_topics(topic, timeout=10).topics[topic]
    leaders = Counter(p.leader for p in metadata.partitions.values() if p.leader in nodes)
    return leaders.most_common(1)[0][0] if leaders else nodes[0]


def chaos_settings(settings: Settings, cluster: LocalCluster, plan: ChaosPlan) -> Settings:
    """`settings` on fresh topics of the cluster, replicated, with the plan's guarantee and
    the static catalog (the registry's own faults are not part of this schedule).
    """
    run = f"chaos-{time.strftime('%Y%m%d-%H%M%S')}-s{plan.seed}"
    settings = with_local_key(fresh_topics(settings, run))
    kafka = settings.kafka.model_copy(update={"bootstrap_servers": cluster.bootstrap})
    topics = settings.topics.model_copy(
        update={"partitions": plan.partitions, "replication_factor": min(3, len(cluster.ports))}
    )
    processing = settings.processing.model_copy(update={"guarantee": plan.guarantee})
    registry = settings.schema_registry.model_copy(update={"url": ""})
    return settings.model_copy(
        update={
            "kafka": kafka,
            "topics": topics,
            "processing": processing,
            "schema_registry": registry,
        }
    )


def default_cluster(home: Path = CHAOS_DIR / "cluster") -> LocalCluster:
    """The chaos run's own three nodes on free ports (not `kafka up`'s)."""
    ports = tuple(free_port() for _ in range(3))
    controllers = tuple(free_port() for _ in range(3))
    return LocalCluster(home, REPO_ROOT / "var" / "kafka" / "libs", ports, controllers)


def run_chaos(
    settings: Settings,
    plan: ChaosPlan,
    console: Console,
    cluster: LocalCluster | None = None,
    out_dir: Path = CHAOS_DIR,
) -> dict[str, Any]:
    """Run `plan` on `cluster` (a fresh one when None, purged after); return the summary."""
    say = console.print
    own = cluster is None
    cluster = cluster or default_cluster(out_dir / f"cluster-{time.monotonic_ns()}")
    say(f"chaos: seed {plan.seed}, {plan.instances} instances, {plan.guarantee}")
    try:
        cluster.up()
        settings = chaos_settings(settings, cluster, plan)
        return _run(settings, cluster, plan, out_dir / settings.consumer.group_id, console)
    finally:
        if own:
            cluster.down(purge=True)


def _run(
    settings: Settings,
    cluster: LocalCluster,
    plan: ChaosPlan,
    run_dir: Path,
    console: Console,
) -> dict[str, Any]:
    say = console.print
    create_topics(settings)
    ensure_models(settings, console)
    chaos = Chaos(settings, cluster, plan, run_dir)
    faults = schedule(plan)
    for index in range(plan.instances):
        chaos.start_instance(index)
    exits: dict[int, int | None] = {}
    try:
        chaos.wait_ready(timeout_s=180)
        sent, t_last = _produce_under_faults(settings, plan, chaos, faults, say)
        caught_up = _wait_caught_up(settings, plan, t_last, say)
        exits = _stop_all(chaos, plan)
    finally:
        for instance in chaos.instances.values():
            if instance.process.poll() is None:
                instance.kill()
    inputs = read_messages(settings.kafka, settings.topics.input, timeout_s=120)
    input_ids = [_event_id(m.value()) for m in inputs]
    decoder = Decoder(schemas.FRAUD_SCORE)
    scores = read_messages(settings.kafka, settings.topics.fraud_scores, timeout_s=120)
    scored_ids = [decoder.decode(m.value())["event_id"] for m in scores]
    dead = len(read_messages(settings.kafka, settings.topics.dead_letter, timeout_s=60))
    verdict = judge(plan, sent, input_ids, scored_ids, dead, exits, caught_up)
    summary = {
        "seed": plan.seed,
        "plan": asdict(plan),
        "passed": verdict.passed,
        "checks": verdict.checks,
        "figures": verdict.figures,
        "faults": [asdict(a) for a in chaos.applied],
        "group": settings.consumer.group_id,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    say(json.dumps({k: summary[k] for k in ("seed", "passed", "checks", "figures")}, indent=2))
    return summary


_CLICK = Decoder(schemas.CLICK_EVENT)


def _event_id(value: bytes | None) -> str:
    return str(_CLICK.decode(value or b"")["event_id"])


def _produce_under_faults(
    settings: Settings,
    plan: ChaosPlan,
    chaos: Chaos,
    faults: list[Fault],
    say: Callable[[str], None],
) -> tuple[ProduceReport, float]:
    """Produce on a thread and apply the faults at their times; return what was sent and
    when (monotonic) the last fault was applied.
    """
    config = GeneratorConfig(events=plan.events, users=plan.users, seed=plan.seed)
    config = config.anchored_before(time.time())
    result: list[ProduceReport] = []
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            result.append(produce_clickstream(settings, config, plan.rate, live=True))
        except BaseException as exc:  # raised on the calling thread
            failure.append(exc)

    producer = threading.Thread(target=produce, name="chaos-producer", daemon=True)
    started = time.monotonic()
    producer.start()
    last = started
    for fault in faults:
        wait = started + fault.at_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now = time.monotonic() - started
        chaos.apply(fault, now)
        last = time.monotonic()
        say(f"  {now:6.1f} s  {chaos.applied[-1].kind} {chaos.applied[-1].target}")
    producer.join()
    if failure:
        raise failure[0]
    return result[0], last


def _wait_caught_up(
    settings: Settings, plan: ChaosPlan, last_repair: float, say: Callable[[str], None]
) -> float | None:
    """Seconds from the last repair until the group committed the input's end; None if it
    did not within `catch_up_s`.
    """
    deadline = last_repair + plan.catch_up_s
    lag = -1
    while time.monotonic() < deadline:
        try:
            lag = sum(row.lag for row in group_lag(settings))
        except (KafkaException, TimeoutError):
            lag = -1
        if lag == 0:
            return round(time.monotonic() - last_repair, 1)
        time.sleep(1.0)
    say(f"  not caught up {plan.catch_up_s:.0f} s after the last repair: lag {lag}")
    return None


def _stop_all(chaos: Chaos, plan: ChaosPlan) -> dict[int, int | None]:
    """SIGTERM every instance at once; each one's exit code, None if it did not stop in
    `stop_timeout_s` (it is killed then). An instance that had already exited keeps the
    code it exited with.
    """
    for instance in chaos.instances.values():
        if instance.process.poll() is None:
            instance.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + plan.stop_timeout_s
    codes: dict[int, int | None] = {}
    for index, instance in chaos.instances.items():
        try:
            codes[index] = instance.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:
            codes[index] = None
    return codes

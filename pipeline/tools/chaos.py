"""`streamscore chaos`: pipeline instances on a replicated cluster under a seeded schedule of
faults, then a verdict read back by read_committed consumers.

Three local KRaft nodes (`LocalCluster`), topics with replication factor 3 and min ISR 2,
`instances` `streamscore run` processes under exactly-once (or at-least-once) and a paced
producer on a thread. While it produces, the faults of the schedule are applied at their
times. The schedule comes from the seed, which is printed, so that a failing run replays:

- `random` (the default) draws faults over the whole run: node faults one at a time (kill
  -9 of the node leading most input partitions, of an instance's transaction coordinator,
  of the group coordinator, of any node, each restarted after 5-15 s, and SIGSTOP of a node
  for 5-30 s), instance kills restarted after 3-10 s, and one scale-out by two instances
  and back;
- `issue48` is the fixed schedule that found issue #48 (`BROKER_FAULTS`): the seed draws
  its targets and shifts each fault by up to `JITTER_S`.

Targets are resolved when a fault is due: "the node leading most input partitions" is the
one that does at that moment; a coordinator is the leader of the internal topic's partition
that Kafka hashes the transactional id or group to. The verdict:

- every input event has exactly one FraudScore, and one Recommendation where it carries
  candidates, under exactly-once (at least one under at-least-once, the duplicates counted);
- under exactly-once, state is exactly-once too: the features behind every score (their
  digest, `processing.emit_features`) equal those of a fault-free replay of the input
  through the same fold (`compute_features`);
- no dead letter (the producer sends only valid events);
- no instance exited unless killed, and each stopped cleanly when asked (a hung one does
  not);
- after the last fault was repaired, the group committed the end of the input within
  `catch_up_s`.

It writes summary.json and timeline.png (faults as bands, scores per second, the group's
lag, each partition's scores per second) to its run folder.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import KafkaException, Message
from confluent_kafka.admin import AdminClient
from rich.console import Console

import schemas
from pipeline.kafka.messages import position, read_messages
from pipeline.serve.events import ClickEvent
from pipeline.serve.features import compute_features, feature_digests
from pipeline.serve.produce import FEATURES_HEADER
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
    "kill_txn_coordinator",  # kill -9 of the transaction coordinator of an instance
    "kill_group_coordinator",  # kill -9 of the pipeline group's coordinator
    "kill_node",  # kill -9 of a node
    "restart_node",
    "stop_node",  # SIGSTOP
    "cont_node",  # SIGCONT
    "kill_instance",  # kill -9 of a pipeline instance
    "restart_instance",
    "scale_out",  # SCALE_BY more instances
    "scale_in",  # SIGTERM to those
]
NODE_FAULTS: tuple[FaultKind, ...] = (
    "kill_leader_node",
    "kill_txn_coordinator",
    "kill_group_coordinator",
    "kill_node",
    "stop_node",
)
REPAIRS: dict[str, FaultKind] = {
    "stop_node": "cont_node",
    "kill_instance": "restart_instance",
    "scale_out": "scale_in",
    **{kind: "restart_node" for kind in NODE_FAULTS if kind.startswith("kill")},
}
SCALE_BY = 2  # instances a scale-out adds: 3 -> 5 -> 3
FIRST_FAULT_S = 15.0  # the random schedule starts after the group settled
QUIET_TAIL_S = 20.0  # and ends this long before production does
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
    instances: int = 3
    partitions: int = 6
    guarantee: Literal["exactly_once", "at_least_once"] = "exactly_once"
    seed: int = 1
    schedule: Literal["random", "issue48"] = "random"
    # Each instance a static member named by its index (deploy/k8s names it by its pod): a
    # restarted instance takes its partitions back without a rebalance.
    static_membership: bool = True
    catch_up_s: float = 60.0  # after the last repair, for the group to commit the input's end
    stop_timeout_s: float = 60.0  # for each instance to stop cleanly at the end


@dataclass(frozen=True, slots=True)
class Fault:
    """One step of the schedule, its target drawn from the seed."""

    at_s: float
    kind: FaultKind
    # A node slot ("a", "n3": a fault and its repair share one; the node is chosen when the
    # fault is due) or an instance index as text; "" for scaling.
    target: str
    instance: int | None = None  # whose transaction coordinator (kill_txn_coordinator)


@dataclass(slots=True)
class Applied:
    """A fault as it was applied."""

    at_s: float
    kind: str
    target: str  # "node 2", "instance 1"
    repair_of: int | None = None  # for a repair, the index of the fault it repairs


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
    """The plan's schedule, in time order (a repair after its fault)."""
    faults = issue48_schedule(plan) if plan.schedule == "issue48" else random_schedule(plan)
    return sorted(faults, key=lambda f: (f.at_s, f.kind in REPAIRS.values()))


def issue48_schedule(plan: ChaosPlan) -> list[Fault]:
    """`BROKER_FAULTS` with the seed's instance and times; node slots stay symbolic."""
    rng = random.Random(plan.seed)
    instance = str(rng.randrange(plan.instances))
    faults = []
    for at_s, kind, target in BROKER_FAULTS:
        jitter = rng.uniform(-JITTER_S, JITTER_S)
        faults.append(Fault(round(at_s + jitter, 1), kind, instance if target == "i" else target))
    return faults


def random_schedule(plan: ChaosPlan) -> list[Fault]:
    """Faults drawn over the run: node faults one at a time, every kind of `NODE_FAULTS`
    once before any repeats (a seeded order each round), each repaired before the next;
    instance kills on their own clock; one scale-out and back in the middle.
    """
    rng = random.Random(plan.seed)
    end = plan.events / plan.rate - QUIET_TAIL_S
    faults: list[Fault] = []
    t, n, order = FIRST_FAULT_S, 0, list[FaultKind]()
    while True:
        if not order:
            order = list(NODE_FAULTS)
            rng.shuffle(order)
        kind = order.pop()
        down = rng.uniform(5, 30) if kind == "stop_node" else rng.uniform(5, 15)
        if t + down > end:
            break
        instance = rng.randrange(plan.instances) if kind == "kill_txn_coordinator" else None
        faults.append(Fault(round(t, 1), kind, f"n{n}", instance))
        faults.append(Fault(round(t + down, 1), REPAIRS[kind], f"n{n}"))
        t += down + rng.uniform(3, 8)
        n += 1
    t = FIRST_FAULT_S + rng.uniform(0, 10)
    while True:
        down = rng.uniform(3, 10)
        if t + down > end:
            break
        index = str(rng.randrange(plan.instances))
        faults.append(Fault(round(t, 1), "kill_instance", index))
        faults.append(Fault(round(t + down, 1), "restart_instance", index))
        t += down + rng.uniform(4, 12)
    at, held = end * rng.uniform(0.3, 0.5), end * rng.uniform(0.15, 0.3)
    if at + held <= end:
        faults.append(Fault(round(at, 1), "scale_out", ""))
        faults.append(Fault(round(at + held, 1), "scale_in", ""))
    return faults


@dataclass(slots=True)
class Observed:
    """What a run read back and saw, for `judge`."""

    sent: ProduceReport
    input_ids: list[str]  # every input event's id, as read back
    scored_ids: list[str]  # the event id of every FraudScore
    candidate_ids: list[str] = field(default_factory=list)  # inputs that carry candidates
    recommended_ids: list[str] = field(default_factory=list)  # of every Recommendation
    digest_mismatches: int | None = None  # scores whose features differ from the replay's
    dead_letters: int = 0
    exits: dict[str, int | None] = field(default_factory=dict)  # at the end, by instance
    unplanned_exits: list[str] = field(default_factory=list)  # "instance 1: 3", not killed
    caught_up_s: float | None = None


def judge(plan: ChaosPlan, seen: Observed) -> Verdict:
    """Count inputs and outputs by event id; decide the run."""
    counts = Counter(seen.scored_ids)
    wanted = set(seen.input_ids)
    unscored = sum(1 for event in wanted if event not in counts)
    duplicated = sum(n - 1 for n in counts.values() if n > 1)
    unexpected = sum(1 for event in counts if event not in wanted)
    recommended = Counter(seen.recommended_ids)
    with_candidates = set(seen.candidate_ids)
    unrecommended = sum(1 for event in with_candidates if event not in recommended)
    duplicated_recommendations = sum(n - 1 for n in recommended.values() if n > 1)
    exactly = plan.guarantee == "exactly_once"
    verdict = Verdict()
    verdict.figures = {
        "events_sent": seen.sent.events,
        "input_events": len(seen.input_ids),
        "scored_events": len(wanted) - unscored,
        "unscored": unscored,
        "unscored_pct": round(100 * unscored / max(1, len(wanted)), 2),
        "duplicated_scores": duplicated,
        "scores_of_unknown_events": unexpected,
        "events_with_candidates": len(with_candidates),
        "unrecommended": unrecommended,
        "duplicated_recommendations": duplicated_recommendations,
        "feature_digest_mismatches": seen.digest_mismatches,
        "dead_letters": seen.dead_letters,
        "instance_exit_codes": seen.exits,
        "unplanned_exits": seen.unplanned_exits,
        "caught_up_after_last_repair_s": seen.caught_up_s,
    }
    checks = {
        "every event written": len(seen.input_ids) == seen.sent.events,
        "every event scored": unscored == 0 and unexpected == 0,
        "every event with candidates recommended": unrecommended == 0,
        "no dead letter": seen.dead_letters == 0,
        "no instance exited unless killed": not seen.unplanned_exits,
        "every instance stopped cleanly": all(code == 0 for code in seen.exits.values()),
        f"caught up within {plan.catch_up_s:.0f} s of the last repair": seen.caught_up_s
        is not None,
    }
    if exactly:
        checks["no duplicated score or recommendation"] = (
            duplicated == 0 and duplicated_recommendations == 0
        )
        checks["features equal a fault-free replay's"] = seen.digest_mismatches == 0
    verdict.checks = checks
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
        self.unplanned_exits: list[str] = []  # instances that exited without being killed
        self.scaled_exits: dict[str, int | None] = {}  # instances scaled in, by exit code
        self._nodes: dict[str, int] = {}  # node slot -> node id, fixed when first faulted
        self._faulted: set[int] = set()  # nodes down or stopped now
        self._open: dict[str, int] = {}  # slot -> index in `applied` of its open fault
        self._noted: set[int] = set()  # pids of the lives in `unplanned_exits`
        self._rng = random.Random(plan.seed * 7919)

    def start_instance(self, index: int) -> None:
        """Start (or restart) instance `index` with its own metrics port and log."""
        self.ports[index] = free_port()
        telemetry = self.settings.telemetry.model_copy(update={"port": self.ports[index]})
        update: dict[str, Any] = {"telemetry": telemetry}
        if self.plan.static_membership:  # as deploy/k8s names each pod's member
            consumer = self.settings.consumer.model_copy(update={"instance_id": f"chaos-{index}"})
            update["consumer"] = consumer
        settings = self.settings.model_copy(update=update)
        directory = self.run_dir / f"instance-{index}"
        if index in self.instances:  # keep the earlier life's log
            self._note_exit(index)
            old = self.instances[index].log_path
            old.rename(old.with_suffix(f".{time.monotonic_ns()}.log"))
        self.instances[index] = RunningPipeline(settings, directory)

    def _note_exit(self, index: int) -> None:
        """Record instance `index`'s life if it exited on its own (a kill -9 shows as -9),
        once a life.
        """
        process = self.instances[index].process
        code = process.poll()
        if code is not None and code != -signal.SIGKILL and process.pid not in self._noted:
            self._noted.add(process.pid)
            self.unplanned_exits.append(f"instance {index}: {code}")

    def check_alive(self) -> None:
        """Record every instance that exited on its own, and leave it be (the verdict says)."""
        for index, instance in self.instances.items():
            if instance.process.poll() != 0:  # a clean exit is the one a SIGTERM asks for
                self._note_exit(index)

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
        repaired = self._open.pop(fault.target, None) if fault.kind in REPAIRS.values() else None
        if fault.kind in ("kill_instance", "restart_instance", "scale_out", "scale_in"):
            target = self._apply_to_instances(fault)
        else:
            node_id = self._node(fault)
            node = self.cluster.node(node_id)
            if fault.kind == "stop_node":
                node.signal(signal.SIGSTOP)
            elif fault.kind == "cont_node":
                node.signal(signal.SIGCONT)
            elif fault.kind == "restart_node":
                node.start()
            else:  # a kill
                node.signal(signal.SIGKILL)
            if fault.kind in REPAIRS.values():
                self._faulted.discard(node_id)
            else:
                self._faulted.add(node_id)
            target = f"node {node_id}"
        if fault.kind in REPAIRS:
            self._open[fault.target] = len(self.applied)
        self.applied.append(Applied(round(t_s, 1), fault.kind, target, repaired))

    def _apply_to_instances(self, fault: Fault) -> str:
        if fault.kind == "scale_out":
            added = [len(self.instances) + k for k in range(SCALE_BY)]
            for index in added:
                self.start_instance(index)
            return "instances " + ", ".join(map(str, added))
        if fault.kind == "scale_in":
            removed = sorted(self.instances)[self.plan.instances :]
            for index in removed:
                self.instances[index].process.send_signal(signal.SIGTERM)
            for index in removed:
                instance = self.instances.pop(index)
                try:
                    code: int | None = instance.process.wait(timeout=self.plan.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    instance.kill()
                    code = None
                self.scaled_exits[str(index)] = code
            return "instances " + ", ".join(map(str, removed))
        index = int(fault.target)
        if fault.kind == "kill_instance":
            self._note_exit(index)
            self.instances[index].kill()
        else:
            self.start_instance(index)
        return f"instance {index}"

    def _node(self, fault: Fault) -> int:
        """The node a slot names, chosen when its fault is first due: the input's busiest
        leader, a coordinator, or (for "kill_node" and "stop_node") a node not faulted now,
        one never faulted before where there is one, in the seed's order.
        """
        if fault.target not in self._nodes:
            nodes = [n.node_id for n in self.cluster.nodes]
            bootstrap = self.cluster.bootstrap
            chosen: int | None
            if fault.kind == "kill_leader_node":
                chosen = leading_most(bootstrap, self.settings.topics.input, nodes)
            elif fault.kind == "kill_group_coordinator":
                group = self.settings.consumer.group_id
                chosen = coordinator(bootstrap, OFFSETS_TOPIC, group, nodes)
            elif fault.kind == "kill_txn_coordinator":
                index = fault.instance if fault.instance is not None else 0
                tid = transactional_id(self.instances[index].log_path)
                chosen = coordinator(bootstrap, TRANSACTIONS_TOPIC, tid, nodes) if tid else None
            else:
                healthy = [n for n in nodes if n not in self._faulted]
                fresh = [n for n in healthy if n not in self._nodes.values()]
                chosen = self._rng.choice(fresh or healthy or nodes)
            # A coordinator that could not be found (metadata not answering): any node.
            self._nodes[fault.target] = nodes[0] if chosen is None else chosen
        return self._nodes[fault.target]


OFFSETS_TOPIC = "__consumer_offsets"  # its partition leaders are the group coordinators
TRANSACTIONS_TOPIC = "__transaction_state"  # and these the transaction coordinators


def leading_most(bootstrap: str, topic: str, nodes: list[int]) -> int:
    """The node that leads most partitions of `topic` now."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    metadata = admin.list_topics(topic, timeout=10).topics[topic]
    leaders = Counter(p.leader for p in metadata.partitions.values() if p.leader in nodes)
    return leaders.most_common(1)[0][0] if leaders else nodes[0]


def java_hash(text: str) -> int:
    """Java's `String.hashCode` (over UTF-16 code units), as a signed 32-bit int."""
    data = text.encode("utf-16-be")
    h = 0
    for i in range(0, len(data), 2):
        h = (31 * h + int.from_bytes(data[i : i + 2], "big")) & 0xFFFFFFFF
    return h - 2**32 if h >= 2**31 else h


def coordinator_partition(key: str, partitions: int) -> int:
    """The internal topic's partition that coordinates `key` (a group id or a transactional
    id): Kafka's `Utils.abs(key.hashCode) % partitions`, where Utils.abs maps
    Integer.MIN_VALUE to 0 (TransactionStateManager.partitionFor, and the group
    coordinator's).
    """
    h = java_hash(key)
    return (0 if h == -(2**31) else abs(h)) % partitions


def coordinator(bootstrap: str, topic: str, key: str, nodes: list[int]) -> int | None:
    """The node coordinating `key` now: the leader of its partition of `topic`."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    metadata = admin.list_topics(topic, timeout=10).topics.get(topic)
    if metadata is None or not metadata.partitions:
        return None
    leader = metadata.partitions[coordinator_partition(key, len(metadata.partitions))].leader
    return leader if leader in nodes else None


def transactional_id(log_path: Path) -> str | None:
    """The transactional id an instance logged last (`transactional_id` events)."""
    found = None
    if log_path.is_file():
        for line in log_path.read_text(errors="replace").splitlines():
            if '"transactional_id"' in line:
                with contextlib.suppress(ValueError):
                    found = json.loads(line).get("transactional_id", found)
    return found


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
    # Each score carries its features' digest, for the verdict's replay.
    processing = settings.processing.model_copy(
        update={"guarantee": plan.guarantee, "emit_features": True}
    )
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
    kinds = Counter(f.kind for f in faults if f.kind not in REPAIRS.values())
    say(f"  {len(faults)} steps: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())))
    for index in range(plan.instances):
        chaos.start_instance(index)
    exits: dict[str, int | None] = {}
    lag = LagSampler(settings)
    try:
        chaos.wait_ready(timeout_s=180)
        lag.start()
        sent, started, t_last = _produce_under_faults(settings, plan, chaos, faults, say)
        caught_up = _wait_caught_up(settings, plan, t_last, say)
        chaos.check_alive()
        exits = {str(k): v for k, v in _stop_all(chaos, plan).items()} | chaos.scaled_exits
    finally:
        lag.stop()
        for instance in chaos.instances.values():
            if instance.process.poll() is None:
                instance.kill()
    say("  reading back the input and the outputs")
    inputs = read_messages(settings.kafka, settings.topics.input, timeout_s=120)
    records = [_CLICK.decode(m.value() or b"") for m in inputs]
    scores = read_messages(settings.kafka, settings.topics.fraud_scores, timeout_s=120)
    decoder = Decoder(schemas.FRAUD_SCORE)
    scored_ids = [decoder.decode(m.value() or b"")["event_id"] for m in scores]
    recommendations = read_messages(settings.kafka, settings.topics.recommendations, 120)
    recommender = Decoder(schemas.RECOMMENDATION)
    say("  replaying the input through the fold, fault-free")
    reference = replay_digests(settings, inputs, records)
    seen = Observed(
        sent=sent,
        input_ids=[str(r["event_id"]) for r in records],
        scored_ids=scored_ids,
        candidate_ids=[str(r["event_id"]) for r in records if r["candidates"]],
        recommended_ids=[
            str(recommender.decode(m.value() or b"")["event_id"]) for m in recommendations
        ],
        digest_mismatches=sum(
            1
            for event, m in zip(scored_ids, scores, strict=True)
            if served_digest(m) != reference.get(event)
        ),
        dead_letters=len(read_messages(settings.kafka, settings.topics.dead_letter, 60)),
        exits=exits,
        unplanned_exits=chaos.unplanned_exits,
        caught_up_s=caught_up,
    )
    verdict = judge(plan, seen)
    started_ms = (time.time() - (time.monotonic() - started)) * 1000  # on the wall clock
    stalls = longest_stalls(chaos.applied, scores, started_ms)
    summary = {
        "seed": plan.seed,
        "plan": asdict(plan),
        "passed": verdict.passed,
        "checks": verdict.checks,
        "figures": verdict.figures,
        "faults_by_kind": dict(Counter(a.kind for a in chaos.applied)),
        "faults": [asdict(a) for a in chaos.applied],
        "longest_stall_after_fault_s": stalls,
        "group": settings.consumer.group_id,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    lags = [(t - started, value) for t, value in lag.samples]
    plot_timeline(run_dir / "timeline.png", chaos.applied, scores, lags, started_ms)
    shown = ("seed", "passed", "checks", "figures", "faults_by_kind")
    say(json.dumps({k: summary[k] for k in shown}, indent=2))
    return summary


_CLICK = Decoder(schemas.CLICK_EVENT)


def replay_digests(
    settings: Settings, inputs: list[Message], records: list[dict[str, Any]]
) -> dict[str, str]:
    """Event id -> the digest of its features in a fault-free replay of the input through
    the serving fold from empty state (each partition's events in their order).
    """
    features = settings.features
    events = []
    for m, record in zip(inputs, records, strict=True):
        _, partition, offset = position(m)
        events.append(
            ClickEvent(**record, partition=partition, offset=offset, ingest_time=m.timestamp()[1])
        )
    batch = compute_features(
        events,
        features.history_length,
        features.session_gap_s,
        allowed_lateness_s=features.allowed_lateness_s,
    )
    return dict(zip((e.event_id for e in events), feature_digests(batch), strict=True))


def served_digest(message: Message) -> str | None:
    """The features digest a FraudScore was served with (its header)."""
    value = dict(message.headers() or []).get(FEATURES_HEADER)
    return value.decode() if isinstance(value, bytes) else None


class LagSampler:
    """The group's total lag every `every_s` on a thread: (monotonic time, lag), -1 where
    the brokers did not answer.
    """

    def __init__(self, settings: Settings, every_s: float = 2.0) -> None:
        """Sample `settings`' group; nothing runs until `start`."""
        self.settings = settings
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-lag", daemon=True)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop, and wait for the last sample."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                lag = sum(row.lag for row in group_lag(self.settings, timeout_s=5))
            except (KafkaException, TimeoutError):
                lag = -1
            self.samples.append((time.monotonic(), lag))


def longest_stalls(
    applied: list[Applied], scores: list[Message], started_ms: float
) -> dict[str, float]:
    """Per fault kind, the longest gap between two scores of one partition that spans a
    fault of that kind: how long the worst-hit partition went without a score.
    """
    times: dict[int, list[float]] = {}
    for m in scores:
        times.setdefault(position(m)[1], []).append(m.timestamp()[1])
    for stamps in times.values():
        stamps.sort()
    out: dict[str, float] = {}
    for fault in applied:
        if fault.kind in REPAIRS.values():
            continue
        at_ms = started_ms + fault.at_s * 1000
        worst = 0.0
        for stamps in times.values():
            after = bisect.bisect_right(stamps, at_ms)
            if 0 < after < len(stamps):
                worst = max(worst, (stamps[after] - stamps[after - 1]) / 1000)
        out[fault.kind] = round(max(out.get(fault.kind, 0.0), worst), 1)
    return out


def plot_timeline(
    path: Path,
    applied: list[Applied],
    scores: list[Message],
    lag: list[tuple[float, int]],
    started_ms: float,
) -> None:
    """Faults as bands (a fault to its repair), scores per second, the group's lag
    ((seconds since production started, lag)), and each partition's scores per second.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stamps = np.array([m.timestamp()[1] for m in scores], dtype=np.float64)
    partitions = np.array([m.partition() for m in scores], dtype=np.int64)
    seconds = (stamps - started_ms) / 1000
    end = max(float(seconds.max()) if len(seconds) else 1.0, 1.0)
    edges = np.arange(0.0, end + 1.0, 1.0)
    figure, (rate, lags, heat) = plt.subplots(3, 1, figsize=(12, 9), sharex=True)
    rate.hist(seconds, bins=edges, color="tab:blue")
    rate.set_ylabel("scores / s")
    if lag:
        answered = [(t, value) for t, value in lag if value >= 0]
        lags.plot([t for t, _ in answered], [value for _, value in answered], color="tab:red")
    lags.set_ylabel("group lag")
    counts = np.zeros((int(partitions.max()) + 1 if len(partitions) else 1, len(edges) - 1))
    for p in range(counts.shape[0]):
        counts[p], _ = np.histogram(seconds[partitions == p], bins=edges)
    heat.imshow(counts, aspect="auto", origin="lower", extent=(0, end, -0.5, counts.shape[0] - 0.5))
    heat.set_ylabel("partition")
    heat.set_xlabel("seconds since production started")
    colours = plt.get_cmap("tab10")
    kinds = sorted({a.kind for a in applied if a.kind not in REPAIRS.values()})
    for a in applied:
        if a.kind in REPAIRS.values():
            continue
        repair = next(
            (r.at_s for r in applied if r.repair_of is not None and applied[r.repair_of] is a),
            a.at_s + 1.0,
        )
        colour = colours(kinds.index(a.kind) % 10)
        for axis in (rate, lags, heat):
            axis.axvspan(a.at_s, repair, color=colour, alpha=0.25, label=a.kind)
    handles, labels = rate.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    rate.legend(unique.values(), unique.keys(), loc="upper right", fontsize=7, ncols=3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _produce_under_faults(
    settings: Settings,
    plan: ChaosPlan,
    chaos: Chaos,
    faults: list[Fault],
    say: Callable[[str], None],
) -> tuple[ProduceReport, float, float]:
    """Produce on a thread and apply the faults at their times; return what was sent, when
    (monotonic) production started and when the last fault was applied.
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
        chaos.check_alive()
        chaos.apply(fault, now)
        last = time.monotonic()
        say(f"  {now:6.1f} s  {chaos.applied[-1].kind} {chaos.applied[-1].target}")
    producer.join()
    if failure:
        raise failure[0]
    return result[0], started, last


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

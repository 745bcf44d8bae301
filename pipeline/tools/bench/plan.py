"""`streamscore plan`: partitions, replicas, batch size, max wait and the KEDA lagThreshold
for a target rate and a latency SLO, from measured bench results, with the arithmetic shown.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pipeline.settings import ConsumerSettings
from schemas.errors import StreamscoreError

# Partition counts that split evenly over many replica counts, so scaling up keeps the
# load even (a replica owns whole partitions).
_PARTITIONS = (6, 12, 24, 36, 48, 60, 72, 96, 120, 180, 240, 360, 480, 720)
_MIN_LAG_THRESHOLD = 100  # below this, lag noise from one batch would flap the scaler
# The longest max_wait_ms `plan` advises, for a loose SLO: at 10,000 events/s it took the
# process from 38-44% of a core at the default 5 to 21%, the broker from 48-52% to 31%.
_RELAXED_WAIT_MS = 20
_SUSTAINED_P99_MS = 1000.0


class PlanError(StreamscoreError, ValueError):
    """The results cannot support a recommendation (e.g. the configuration never ran)."""


@dataclass(frozen=True, slots=True)
class Recommendation:
    """What to deploy, and why."""

    target_eps: float
    latency_slo_ms: float
    guarantee: str
    per_pod_eps: float
    slo_met_in_bench: bool
    replicas: int
    partitions: int
    max_replicas: int
    max_batch: int
    max_wait_ms: int
    lag_threshold: int
    reasoning: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """For --json."""
        return asdict(self)


def recommend(
    results: dict[str, Any],
    target_eps: float,
    latency_slo_ms: float,
    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once",
) -> Recommendation:
    """The deployment for `target_eps` at p99 ≤ `latency_slo_ms`, from one bench's results."""
    if target_eps <= 0 or latency_slo_ms <= 0:
        raise PlanError("--target-eps and --latency-slo-ms must be positive")
    name = "streamscore_alo_1p" if guarantee == "at_least_once" else "streamscore_eos_1p"
    entry = results.get("configs", {}).get(name)
    if entry is None:
        raise PlanError(f"the bench results have no {name}; run `streamscore bench`")
    why: list[str] = []
    machine = results.get("machine", {})
    why.append(
        f"Measured on {machine.get('cores', '?')} cores ({machine.get('cpu_model', '?')}), "
        f"bench run {results.get('run', '?')}: one {guarantee} process sustains "
        f"{entry['throughput_eps']:,.0f} events/s at most."
    )

    # Per-pod rate: the highest measured load whose p99 met the SLO.
    points = sorted(entry["latency"], key=lambda p: p["achieved_eps"])
    # A step's p99 over a second means its queue grew through the step: not sustained.
    bound = min(latency_slo_ms, _SUSTAINED_P99_MS)
    meeting = [p for p in points if not math.isnan(p["p99_ms"]) and p["p99_ms"] <= bound]
    if meeting:
        chosen = meeting[-1]
        met = True
        why.append(
            f"Per pod: {chosen['achieved_eps']:,.0f} events/s, the highest measured load "
            f"({chosen['fraction']:.0%} of max) with p99 {chosen['p99_ms']} ms ≤ "
            f"{bound:g} ms (the SLO, or {_SUSTAINED_P99_MS:g} ms above which a step's "
            "queue was still growing)."
        )
    else:
        chosen = points[0]
        met = False
        why.append(
            f"No measured load met p99 ≤ {latency_slo_ms:g} ms (lowest: p99 "
            f"{chosen['p99_ms']} ms at {chosen['achieved_eps']:,.0f} events/s). Planning at "
            "that load anyway; the SLO needs faster hardware, a smaller batch or a looser SLO."
        )
    per_pod = float(chosen["achieved_eps"])

    replicas = max(1, math.ceil(target_eps / per_pod))
    why.append(
        f"Replicas: ceil({target_eps:,.0f} / {per_pod:,.0f}) = {replicas}. Bench processes "
        "shared two cores with the broker, so a pod with its own core does at least this."
    )
    headroom = 2 * replicas
    partitions = next((p for p in _PARTITIONS if p >= headroom), headroom)
    why.append(
        f"Partitions: {partitions}, the first even-splitting count ≥ 2 × {replicas} replicas, "
        "so the group can double before replicas sit idle (a partition has one owner)."
    )
    max_replicas = partitions
    why.append(f"maxReplicaCount: {max_replicas} (= partitions; more would idle).")

    max_batch, batch_why = _batch(results, latency_slo_ms, per_pod)
    why.append(batch_why)
    max_wait = max(1, min(_RELAXED_WAIT_MS, int(latency_slo_ms / 5)))
    why.append(
        f"max_wait_ms: {max_wait} = min({_RELAXED_WAIT_MS}, SLO / 5): the broker holds a fetch "
        "up to this long for fetch_min_bytes, at most a fifth of the budget at low rates (a "
        "batch never waits to fill); at high rates fetches fill before it. A longer wait "
        f"costs less CPU at low rates; {_RELAXED_WAIT_MS} is the longest measured."
    )
    lag = max(_MIN_LAG_THRESHOLD, int(per_pod * latency_slo_ms / 1000))
    why.append(
        f"KEDA lagThreshold: {lag} = max({_MIN_LAG_THRESHOLD}, {per_pod:,.0f} events/s × "
        f"{latency_slo_ms / 1000:g} s). A pod's lag above what it clears within the SLO means "
        "its newest events already wait longer than the SLO, so KEDA adds a replica "
        "(desired = ceil(total lag / lagThreshold))."
    )
    return Recommendation(
        target_eps=target_eps,
        latency_slo_ms=latency_slo_ms,
        guarantee=guarantee,
        per_pod_eps=per_pod,
        slo_met_in_bench=met,
        replicas=replicas,
        partitions=partitions,
        max_replicas=max_replicas,
        max_batch=max_batch,
        max_wait_ms=max_wait,
        lag_threshold=lag,
        reasoning=why,
    )


def _batch(results: dict[str, Any], latency_slo_ms: float, per_pod: float) -> tuple[int, str]:
    """The smallest measured batch size within 90% of the best throughput, capped so one
    batch is processed within a fifth of the SLO at the per-pod rate.
    """
    sweep = results.get("sweep", {}).get("batch_size") or []
    cap = max(16, int(per_pod * latency_slo_ms / 5000))
    if not sweep:
        default = ConsumerSettings().max_batch
        return min(default, cap), (
            f"max_batch: {min(default, cap)} (no sweep in these results; the default "
            f"{default}, capped at per-pod rate × SLO / 5 = {cap})."
        )
    best = max(point["throughput_eps"] for point in sweep)
    good = [p["value"] for p in sweep if p["throughput_eps"] >= 0.9 * best]
    smallest = min(good)
    chosen = min(smallest, cap)
    return chosen, (
        f"max_batch: {chosen} = min({smallest}, the smallest swept batch within 90% of the "
        f"best {best:,.0f} events/s; {cap}, what a pod processes in a fifth of the SLO)."
    )

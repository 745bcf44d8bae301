"""What a bench run runs: the configurations under test, the plan (how much of each
phase), and the generated events that every configuration reads, encoded once.
"""

from __future__ import annotations

import gc
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import schemas
from pipeline.training.generator import ClickstreamGenerator, GeneratorConfig
from schemas.codec import Decoder, Encoder

Kind = Literal["ceiling", "naive", "peer", "streamscore"]


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
        probe's split read 0 ms for it).
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

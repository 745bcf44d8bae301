"""What a run counts: `RunStats`, written to `--stats-file` on exit (the bench's stage table
divides its times by `consumed`), and the Prometheus series of each finished batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import numpy as np

from pipeline.serve.records import DeadLetter, Scored
from pipeline.settings import TopicSettings
from pipeline.telemetry import Telemetry, observe_many

# The loop's stages, in its order (the bench's stage table has a column for each).
STAGES = ("consume", "decode", "features", "score", "encode", "produce", "commit")
Mark = tuple[float, float]  # `StageClock.start`: the wall clock, then the thread's CPU clock


def _zeroes() -> dict[str, float]:
    return dict.fromkeys(STAGES, 0.0)


@dataclass(slots=True)
class StageClock:
    """Seconds in each stage of the loop: wall time, and the loop thread's own CPU time
    (`time.thread_time`). A stage's wall time less its CPU time is waiting (for a fetch, the
    engines) or being descheduled while the engines' thread, librdkafka's threads and the
    broker share the cores.
    """

    wall: dict[str, float] = field(default_factory=_zeroes)
    cpu: dict[str, float] = field(default_factory=_zeroes)

    @staticmethod
    def start() -> Mark:
        """The clocks now, for `stop`."""
        return time.perf_counter(), time.thread_time()

    def stop(self, stage: str, mark: Mark) -> float:
        """Add the time since `mark` to `stage`; its wall seconds. The CPU clock is read
        inside the wall interval: the clocks' own cost and what follows count in neither.
        """
        cpu = time.thread_time() - mark[1]
        wall = time.perf_counter() - mark[0]
        self.add(stage, wall, cpu)
        return wall

    def add(self, stage: str, wall_s: float, cpu_s: float) -> None:
        """Add an interval measured elsewhere (a batch's stages, summed when it finishes)."""
        self.wall[stage] += wall_s
        self.cpu[stage] += cpu_s

    def fields(self) -> dict[str, float]:
        """`<stage>_s` and `<stage>_cpu_s` of every stage: the stats file's names."""
        return {
            **{f"{stage}_s": seconds for stage, seconds in self.wall.items()},
            **{f"{stage}_cpu_s": seconds for stage, seconds in self.cpu.items()},
        }


@dataclass(slots=True)
class RunStats:
    """Counts and busy time of one run; written to `--stats-file` on exit."""

    consumed: int = 0
    scored: int = 0
    replayed: int = 0
    late: int = 0
    recommendations: int = 0
    shadow_scored: int = 0  # events a challenger also scored (to topics.shadow_scores)
    dead_lettered: int = 0
    batches: int = 0
    busy_s: float = 0.0
    restored: int = 0
    restore_s: float = 0.0
    rewinds: int = 0
    pauses: int = 0
    # Seconds in each stage (the bench's stage table divides them by `consumed`).
    stages: StageClock = field(default_factory=StageClock)

    def report(self) -> dict[str, int | float]:
        """The counts and each stage's times by name, as the stats file and the last log
        line give them.
        """
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stages"}
        return {**counts, **self.stages.fields()}


def count_batch(
    stats: RunStats,
    telemetry: Telemetry,
    topics: TopicSettings,
    messages: int,
    replayed: int,
    late: int,
    scored: Scored,
    dead: list[DeadLetter],
    ingest_time: np.ndarray,
) -> None:
    """Count one finished batch of `messages` consumed messages: its scores, replays, late
    events and dead letters, and each scored event's end-to-end latency from its input's
    Kafka timestamp (`ingest_time`, per scored row) to now.
    """
    stats.batches += 1
    stats.scored += len(scored.rows)
    stats.replayed += replayed
    stats.late += late
    stats.recommendations += len(scored.ranked)
    stats.dead_lettered += len(dead)
    telemetry.batch_size.observe(messages)
    telemetry.consumed.labels(topic=topics.input).inc(messages)
    telemetry.produced.labels(topic=topics.fraud_scores).inc(len(scored.rows))
    telemetry.produced.labels(topic=topics.recommendations).inc(len(scored.ranked))
    if scored.shadow is not None:
        stats.shadow_scored += len(scored.rows)
        telemetry.produced.labels(topic=topics.shadow_scores).inc(len(scored.rows))
    telemetry.produced.labels(topic=topics.dead_letter).inc(len(dead))
    for record in dead:
        telemetry.dead_letters.labels(reason=record["error_kind"]).inc()
    now_ms = time.time() * 1000
    observe_many(telemetry.end_to_end_seconds, np.maximum(0.0, now_ms - ingest_time) / 1000)

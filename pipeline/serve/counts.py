"""What a run counts: `RunStats`, written to `--stats-file` on exit (the bench's stage table
divides its times by `consumed`), and the Prometheus series of each finished batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pipeline.serve.records import DeadLetter, Scored
from pipeline.settings import TopicSettings
from pipeline.telemetry import Telemetry, observe_many


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
    # Seconds in each stage of the loop (the bench's stage table divides them by `consumed`).
    consume_s: float = 0.0
    decode_s: float = 0.0
    features_s: float = 0.0
    score_s: float = 0.0  # engine inputs, the engines (inline or waited for), shaping
    encode_s: float = 0.0
    produce_s: float = 0.0
    commit_s: float = 0.0
    # The loop thread's own CPU seconds in each (`time.thread_time`): a stage's wall time
    # less its CPU time is waiting (for a fetch, the engines) or being descheduled while
    # the engines' thread, librdkafka's threads and the broker share the cores.
    consume_cpu_s: float = 0.0
    decode_cpu_s: float = 0.0
    features_cpu_s: float = 0.0
    score_cpu_s: float = 0.0
    encode_cpu_s: float = 0.0
    produce_cpu_s: float = 0.0
    commit_cpu_s: float = 0.0


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

"""`streamscore engines bench`: latency and throughput per backend and batch size."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from engines.base import Engine
from engines.inputs import random_inputs
from engines.registry import ModelArtifact

BATCH_SIZES = (1, 8, 64, 256, 1024)


@dataclass(frozen=True, slots=True)
class BenchRow:
    """One (model, backend, batch) measurement; times are medians over repeats."""

    model: str
    backend: str
    device: str  # "gpu" or "cpu": torch and ONNX Runtime run on either
    batch: int
    us_per_batch: float
    us_per_event: float
    events_per_s: float


def bench_engine(
    artifact: ModelArtifact,
    engine: Engine,
    batches: tuple[int, ...] = BATCH_SIZES,
    min_seconds: float = 0.3,
) -> list[BenchRow]:
    """Time `engine` on fresh random valid inputs at each batch size."""
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        inputs = random_inputs(artifact, batch, rng)
        seconds = _median_call(partial(engine.infer, inputs), min_seconds)
        rows.append(
            BenchRow(
                model=artifact.name,
                backend=engine.backend,
                device="gpu" if engine.on_gpu else "cpu",
                batch=batch,
                us_per_batch=seconds * 1e6,
                us_per_event=seconds * 1e6 / batch,
                events_per_s=batch / seconds,
            )
        )
    return rows


def _median_call(call: Callable[[], object], min_seconds: float) -> float:
    """Median wall time of `call` after a warm-up, repeated for at least `min_seconds`."""
    for _ in range(3):
        call()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < 5 or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))

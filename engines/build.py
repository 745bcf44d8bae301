"""`streamscore engines build`: build or refresh this machine's engines ahead of serving.

For TensorRT that means parsing the ONNX (FP16 first converted by ModelOpt AutoCast when
`engine.precision = "fp16"`), building the plan and storing it in the engine cache, so a
pipeline start only deserialises. ONNX Runtime and torch compile nothing ahead of time; for
them the build loads the model and checks it. Every engine then runs a batch of 1 and a batch
of its max on random valid inputs and must return finite outputs of the right length. Unlike
serving, a build never falls back to another backend: a failure is reported as one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.base import Engine, EngineError
from engines.factory import choose_backend, load_backend
from engines.inputs import random_inputs
from engines.registry import ModelArtifact, resolve
from engines.settings import Backend, EngineSettings

Step = Callable[[int, str], None]  # (engines done, what is being built now)


@dataclass(frozen=True, slots=True)
class BuildResult:
    """One engine built and checked."""

    model: str
    version: str
    backend: str
    precision: str
    max_batch: int
    artefact: str
    seconds: float


def build_engines(
    settings: EngineSettings, refresh: bool = False, step: Step = lambda *_: None
) -> list[BuildResult]:
    """Build, cache and check the pinned models' engines on the configured backend."""
    backend = choose_backend(settings.backend)
    results = []
    for done, pin in enumerate(settings.pins()):
        artifact = resolve(settings.model_dir, pin.name, pin.version)
        step(done, f"{pin.name} v{artifact.version} on {backend.value}")
        if refresh:
            _forget_plans(settings.engine_cache_dir, artifact)
        started = time.perf_counter()
        engine = load_backend(artifact, backend, settings, pin.max_batch)
        try:
            _check(engine, artifact)
        finally:
            engine.close()
        results.append(
            BuildResult(
                model=pin.name,
                version=artifact.version,
                backend=engine.backend,
                precision=settings.precision if backend is Backend.TENSORRT else "fp32",
                max_batch=engine.max_batch_size,
                artefact=str(getattr(engine, "plan_path", artifact.onnx_path)),
                seconds=time.perf_counter() - started,
            )
        )
    step(len(results), "done")
    return results


def _forget_plans(cache_dir: Path, artifact: ModelArtifact) -> None:
    for plan in cache_dir.glob(f"{artifact.name}-{artifact.version}-*.plan"):
        plan.unlink()


def _check(engine: Engine, artifact: ModelArtifact) -> None:
    rng = np.random.default_rng(0)
    for batch in sorted({1, engine.max_batch_size}):
        outputs = engine.infer(random_inputs(artifact, batch, rng))
        for name, value in outputs.items():
            if len(value) != batch or not np.all(np.isfinite(value)):
                raise EngineError(
                    f"{artifact.name} v{artifact.version} on {engine.backend}: output {name} "
                    f"is not {batch} rows of finite values"
                )

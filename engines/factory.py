"""Backend selection: `auto` takes TensorRT when it imports and a GPU is present, otherwise
ONNX Runtime; a backend that fails to load falls back to ONNX Runtime with a warning.
"""

from __future__ import annotations

import importlib.util

import structlog

from engines.base import Engine, EngineError
from engines.onnxruntime import OnnxRuntimeEngine
from engines.registry import ModelArtifact, resolve
from pipeline.settings import Backend, EngineSettings

log = structlog.get_logger("streamscore.engines")


def gpu_available() -> bool:
    """Whether torch sees a CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT backend cannot run here, or None when it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (it ships only on NVIDIA's package index)"
    if importlib.util.find_spec("pycuda") is None:
        return "pycuda is not installed (the `gpu` extra builds it against the CUDA toolkit)"
    if not gpu_available():
        return "no CUDA GPU is present"
    return None


def choose_backend(requested: Backend) -> Backend:
    """The backend `requested` resolves to on this machine."""
    if requested is not Backend.AUTO:
        return requested
    reason = tensorrt_unavailable_reason()
    if reason is None:
        return Backend.TENSORRT
    log.info("backend_auto_skipped_tensorrt", reason=reason)
    return Backend.ONNXRUNTIME


def load_engine(name: str, version: str, settings: EngineSettings) -> Engine:
    """Load model `name`@`version` on the configured backend, falling back to ONNX Runtime."""
    artifact = resolve(settings.model_dir, name, version)
    backend = choose_backend(settings.backend)
    try:
        engine = _load(artifact, backend, settings)
    except (EngineError, ImportError, RuntimeError) as exc:
        if backend is Backend.ONNXRUNTIME:
            raise
        log.warning("engine_fallback", model=name, backend=backend.value, error=str(exc))
        engine = _load(artifact, Backend.ONNXRUNTIME, settings)
    log.info("engine_loaded", model=name, version=artifact.version, backend=engine.backend)
    return engine


def _load(artifact: ModelArtifact, backend: Backend, settings: EngineSettings) -> Engine:
    if backend is Backend.ONNXRUNTIME:
        return OnnxRuntimeEngine(artifact, threads=settings.threads)
    if backend is Backend.TORCH:
        from engines.torch import TorchEngine

        return TorchEngine(artifact, device="cuda" if gpu_available() else "cpu")
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise EngineError(f"tensorrt backend unavailable: {reason}")
    from engines.tensorrt import TensorRTEngine

    return TensorRTEngine(artifact, settings.engine_cache_dir)

"""Backend selection: `auto` takes TensorRT when it imports and a GPU is present, otherwise
ONNX Runtime; a backend that fails to load falls back to ONNX Runtime with a warning.
"""

from __future__ import annotations

import importlib.util

import structlog

from engines.base import Engine, EngineError
from engines.onnxruntime import OnnxRuntimeEngine
from engines.registry import ModelArtifact, resolve
from engines.settings import Backend, EngineSettings, ModelPin

log = structlog.get_logger("streamscore.engines")


def gpu_available() -> bool:
    """Whether a CUDA device is present. Asked of the CUDA driver through pycuda, the TensorRT
    backend's own dependency, so a serving install needs no torch; else of torch; False when
    neither is installed.
    """
    try:
        import pycuda.driver as cuda
    except ImportError:  # not installed, or no CUDA driver library to link against
        pass
    else:
        try:
            cuda.init()
            return bool(cuda.Device.count() > 0)
        except cuda.Error:
            return False
    try:
        import torch
    except ImportError:
        return False
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


def load_engine(pin: ModelPin, settings: EngineSettings, version: str | None = None) -> Engine:
    """Load the pinned model (or `version` of it) on the configured backend, falling back to
    ONNX Runtime with a warning when that backend cannot build or load it.
    """
    artifact = resolve(settings.model_dir, pin.name, version or pin.version)
    backend = choose_backend(settings.backend)
    try:
        engine = load_backend(artifact, backend, settings, pin.max_batch)
    # Any error: GPU stacks fail in classes of their own (pycuda's driver errors derive from
    # Exception, not RuntimeError), and OSError or AttributeError from a broken install
    # should cost the GPU, not the start-up.
    except Exception as exc:
        if backend is Backend.ONNXRUNTIME:
            raise
        log.warning(
            "engine_fallback",
            model=pin.name,
            backend=backend.value,
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            error=str(exc),
        )
        engine = load_backend(artifact, Backend.ONNXRUNTIME, settings, pin.max_batch)
    log.info(
        "engine_loaded",
        model=pin.name,
        version=artifact.version,
        backend=engine.backend,
        max_batch=engine.max_batch_size,
    )
    return engine


def load_backend(
    artifact: ModelArtifact, backend: Backend, settings: EngineSettings, max_batch: int
) -> Engine:
    """`artifact` on exactly `backend` (not `auto`), with no fallback."""
    if backend is Backend.ONNXRUNTIME:
        return OnnxRuntimeEngine(artifact, threads=settings.threads, max_batch_size=max_batch)
    if backend is Backend.TORCH:
        import torch

        from engines.torch import TorchEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return TorchEngine(artifact, device=device, max_batch_size=max_batch)
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise EngineError(f"tensorrt backend unavailable: {reason}")
    from engines.tensorrt import Profile, TensorRTEngine

    profile = Profile(min_batch=1, opt_batch=min(256, max_batch), max_batch=max_batch)
    return TensorRTEngine(artifact, settings.engine_cache_dir, profile, settings.precision)

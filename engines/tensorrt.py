"""TensorRT backend (10.x and 11.x API) with pycuda buffers.

Engines are built from the model's ONNX file as a strongly typed network (so the FP16 types
of an AutoCast ONNX bind on 10.x as they always do on 11.x), with one optimisation profile
over the batch axis, a workspace limit and a persisted timing cache, then serialised into a
cache keyed by ONNX hash + TensorRT version + GPU name and compute capability + profile +
build configuration. At load the cached plan is deserialised; a missing, stale or unreadable
plan is rebuilt. Precision comes from the ONNX file itself (TensorRT 11 removed the builder
precision flags), so FP16 builds from the FP16 ONNX that `fp16_onnx` makes
with ModelOpt AutoCast into the engine cache; its own hash keys the plan. Plans and timing
caches are written atomically: replicas share the cache directory.

pycuda shares the device's primary context with TensorRT; each engine owns one execution
context, one stream and page-locked host buffers, so use one engine per worker. An engine may
be loaded on one thread (the model watcher's) and run and closed on others (the pipeline's):
every call pushes the primary context for its own duration.

Nothing here runs without the `gpu` extra and a CUDA GPU; `engines.factory` checks both first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from engines.base import Arrays, EngineError
from engines.registry import ModelArtifact, file_sha256, write_atomic

FP16_SUFFIX = ".fp16.onnx"

log = structlog.get_logger("streamscore.engines")

WORKSPACE_BYTES = 1 << 30
# Bump when the way plans are built changes (flags, builder options), so plans built the old
# way are not reused. 2: strongly typed networks.
BUILD_VERSION = 2


@dataclass(frozen=True, slots=True)
class Profile:
    """The batch range one optimisation profile covers."""

    min_batch: int = 1
    opt_batch: int = 256
    max_batch: int = 1024


def network_flags(trt: Any) -> int:
    """Network creation flags: STRONGLY_TYPED where this TensorRT has it (looked up by name:
    10.x needs it for the ONNX's FP16 types to bind; 11.x networks are strongly typed anyway).
    """
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if strongly_typed is None else 1 << int(strongly_typed)


def build_config(trt: Any) -> str:
    """Everything about how a plan is built that is not the ONNX, the GPU or the profile."""
    return json.dumps(
        {
            "build": BUILD_VERSION,
            "network_flags": network_flags(trt),
            "workspace": WORKSPACE_BYTES,
        },
        sort_keys=True,
    )


def engine_cache_key(
    onnx_sha256: str,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    profile: Profile,
    build: str,
) -> str:
    """Engines are tied to all of these; any change means a rebuild."""
    material = json.dumps(
        [
            onnx_sha256,
            tensorrt_version,
            gpu_name,
            compute_capability,
            profile.min_batch,
            profile.opt_batch,
            profile.max_batch,
            build,
        ]
    )
    return hashlib.sha256(material.encode()).hexdigest()[:24]


def timing_cache_path(
    cache_dir: Path, tensorrt_version: str, gpu_name: str, compute_capability: str
) -> Path:
    """A timing cache holds measurements of one GPU model under one TensorRT version."""
    material = json.dumps([tensorrt_version, gpu_name, compute_capability])
    return cache_dir / f"timing-{hashlib.sha256(material.encode()).hexdigest()[:24]}.cache"


def use_timing_cache(config: Any, saved: bytes) -> None:
    """Give the builder the `saved` timing cache, or an empty one when TensorRT refuses it
    (made on another device or version: `set_timing_cache` then returns False and the build
    would otherwise end with no cache to save).
    """
    if config.set_timing_cache(config.create_timing_cache(saved), False):
        return
    log.warning("tensorrt_timing_cache_ignored", bytes=len(saved))
    if not config.set_timing_cache(config.create_timing_cache(b""), False):
        raise EngineError("TensorRT refused an empty timing cache")


def save_timing_cache(config: Any, path: Path) -> None:
    """Persist the builder's timing cache after a build, atomically."""
    cache = config.get_timing_cache()
    if cache is None:
        log.warning("tensorrt_timing_cache_missing", path=str(path))
        return
    write_atomic(path, bytes(cache.serialize()))


class DeviceBuffers:
    """The page-locked host buffers, device buffers and stream of one engine."""

    def __init__(self, cuda: Any, specs: dict[str, tuple[tuple[int, ...], Any]]) -> None:
        """Allocate a host and a device buffer per tensor name (shape, numpy dtype)."""
        self._cuda = cuda
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, Any] = {}
        self.stream: Any = cuda.Stream()
        for name, (shape, dtype) in specs.items():
            self.host[name] = cuda.pagelocked_empty(shape, dtype)
            self.device[name] = cuda.mem_alloc(self.host[name].nbytes)

    def release(self) -> None:
        """Free everything now (call with the owning context current)."""
        for buffer in self.device.values():
            buffer.free()
        for array in self.host.values():
            allocation: Any = array.base  # pagelocked_empty's array owns its HostAllocation
            allocation.free()
        self.device.clear()
        self.host.clear()
        self.stream = None  # the last reference: pycuda destroys the stream here


class TensorRTEngine:
    """One deserialised engine, its execution context, stream and buffers."""

    backend = "tensorrt"
    on_gpu = True

    def __init__(
        self,
        artifact: ModelArtifact,
        cache_dir: Path,
        profile: Profile = Profile(),
        precision: str = "fp32",
    ) -> None:
        """Load the cached plan for this machine, building it first when needed."""
        import pycuda.driver as cuda
        import tensorrt as trt

        self.name = artifact.name
        self.version = artifact.version
        self.manifest = artifact.manifest
        self.max_batch_size = profile.max_batch
        self._trt, self._cuda = trt, cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._closed = False
        cuda.init()
        device = cuda.Device(0)
        gpu, capability = device.name(), "{}.{}".format(*device.compute_capability())
        self._context_handle = device.retain_primary_context()
        self._context_handle.push()
        try:
            onnx_path = artifact.onnx_path
            if precision == "fp16":
                onnx_path = fp16_onnx(onnx_path, cache_dir)
            key = engine_cache_key(
                file_sha256(onnx_path), trt.__version__, gpu, capability, profile, build_config(trt)
            )
            plan = f"{artifact.name}-{artifact.version}-{precision}-{key}.plan"
            self.plan_path = cache_dir / plan
            self.timing_path = timing_cache_path(cache_dir, trt.__version__, gpu, capability)
            self._engine, self.built = self._load_or_build(onnx_path, profile)
            self._context = self._engine.create_execution_context()
            self._buffers = DeviceBuffers(cuda, self._tensor_specs(profile.max_batch))
        except BaseException:
            self._context_handle.detach()  # current here: releases the retain and pops it
            raise
        self._context_handle.pop()

    def infer(self, inputs: Arrays) -> dict[str, np.ndarray]:
        """Copy in, `execute_async_v3` on this engine's stream, copy out, synchronise."""
        cuda, buffers = self._cuda, self._buffers
        batch = len(next(iter(inputs.values())))
        if batch > self.max_batch_size:
            raise EngineError(f"batch {batch} exceeds the profile's max {self.max_batch_size}")
        self._context_handle.push()
        try:
            for name in self._inputs:
                host = buffers.host[name][:batch]
                np.copyto(host, inputs[name], casting="same_kind")
                cuda.memcpy_htod_async(buffers.device[name], host, buffers.stream)
                self._context.set_input_shape(name, host.shape)
            for name in self._names:
                self._context.set_tensor_address(name, int(buffers.device[name]))
            if not self._context.execute_async_v3(buffers.stream.handle):
                raise EngineError(f"TensorRT execution of {self.name} failed")
            for name in self._outputs:
                host = buffers.host[name][:batch]
                cuda.memcpy_dtoh_async(host, buffers.device[name], buffers.stream)
            buffers.stream.synchronize()  # buffers are only valid after this
        finally:
            self._context_handle.pop()
        return {name: buffers.host[name][:batch].copy() for name in self._outputs}

    def close(self) -> None:
        """Free the buffers and the stream, drop the engine, release the primary context.

        All of it with the context current in the calling thread: pycuda silently keeps a
        context that is detached from a thread other than its creator's unless it is current
        there, and the pipeline loads engines on its reload thread but closes them on its own.
        """
        if self._closed:
            return
        self._closed = True
        self._context_handle.push()
        try:
            self._buffers.release()
            del self._context, self._engine
        finally:
            self._context_handle.detach()  # current: releases the retain and pops it

    # -- building -------------------------------------------------------------------------

    def _load_or_build(self, onnx_path: Path, profile: Profile) -> tuple[Any, bool]:
        """The engine, and whether it had to be built (False: the cached plan was used)."""
        runtime = self._trt.Runtime(self._logger)
        if self.plan_path.is_file():
            engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if engine is not None:
                return engine, False
            log.warning("tensorrt_plan_unreadable", plan=str(self.plan_path))
        serialized = self._build(onnx_path, profile)
        write_atomic(self.plan_path, serialized)
        engine = runtime.deserialize_cuda_engine(serialized)
        if engine is None:
            raise EngineError(f"TensorRT could not deserialise the plan it built for {self.name}")
        return engine, True

    def _build(self, onnx_path: Path, profile: Profile) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        optimisation = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            rest = tuple(tensor.shape)[1:]
            optimisation.set_shape(
                tensor.name,
                (profile.min_batch, *rest),
                (profile.opt_batch, *rest),
                (profile.max_batch, *rest),
            )
        config.add_optimization_profile(optimisation)
        timing = self.timing_path
        use_timing_cache(config, timing.read_bytes() if timing.is_file() else b"")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"TensorRT failed to build an engine for {self.name}")
        save_timing_cache(config, timing)
        return bytes(serialized)

    def _tensor_specs(self, max_batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        trt, engine = self._trt, self._engine
        self._names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [
            n for n in self._names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        ]
        self._outputs = [n for n in self._names if n not in self._inputs]
        return {
            name: (
                (max_batch, *tuple(engine.get_tensor_shape(name))[1:]),
                trt.nptype(engine.get_tensor_dtype(name)),
            )
            for name in self._names
        }


def fp16_onnx(onnx_path: Path, cache_dir: Path) -> Path:
    """The FP16 variant of `onnx_path`, made once with ModelOpt AutoCast into `cache_dir`.

    It is a derived artefact, so it goes to the engine cache, never beside the model: the
    model directory is mounted read-only in production. It is named by the source's hash, so
    versions never mix, and written atomically, so replicas sharing the cache do not race.

    TensorRT 11 has no builder precision flags: reduced precision must be in the ONNX file.
    AutoCast keeps nodes whose values overflow FP16 (the -1e4 attention mask, for one) in
    FP32 and keeps the inputs and outputs FP32, so callers see the same signature.
    """
    target = cache_dir / f"{file_sha256(onnx_path)[:24]}{FP16_SUFFIX}"
    if target.is_file():
        return target
    try:
        import onnx
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise EngineError(
            "precision fp16 needs nvidia-modelopt[onnx] (in the `gpu` extra)"
        ) from exc
    model = convert_to_mixed_precision(
        onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True
    )
    onnx.checker.check_model(model, full_check=True)
    write_atomic(target, model.SerializeToString())
    return target

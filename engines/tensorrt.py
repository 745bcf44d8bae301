"""TensorRT backend (10.x and 11.x API) with pycuda buffers.

Engines are built from the model's ONNX file with one optimisation profile over the batch
axis, a workspace limit and a persisted timing cache, then serialised into a cache keyed by
ONNX hash + TensorRT version + GPU name and compute capability + profile. At load the cached
plan is deserialised; a missing, stale or unreadable plan is rebuilt. Precision comes from
the ONNX file itself (TensorRT 11 removed the builder precision flags), so FP16 builds from
the FP16 ONNX that `engines.export.fp16_onnx` makes with ModelOpt AutoCast; its own hash
keys the cache. pycuda shares the device's primary context with TensorRT; each engine owns
one execution context, one stream and page-locked host buffers, so use one engine per worker.

Nothing here runs without the `gpu` extra and a CUDA GPU; `engines.factory` checks both first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Arrays, EngineError
from engines.export import file_sha256, fp16_onnx
from engines.registry import ModelArtifact

WORKSPACE_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class Profile:
    """The batch range one optimisation profile covers."""

    min_batch: int = 1
    opt_batch: int = 256
    max_batch: int = 1024


def engine_cache_key(
    onnx_sha256: str,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    profile: Profile,
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
        ]
    )
    return hashlib.sha256(material.encode()).hexdigest()[:24]


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
        cuda.init()
        device = cuda.Device(0)
        self._context_handle = device.retain_primary_context()
        self._context_handle.push()
        try:
            onnx_path = artifact.onnx_path if precision == "fp32" else fp16_onnx(artifact.onnx_path)
            key = engine_cache_key(
                file_sha256(onnx_path),
                trt.__version__,
                device.name(),
                "{}.{}".format(*device.compute_capability()),
                profile,
            )
            plan = cache_dir / f"{artifact.name}-{artifact.version}-{precision}-{key}.plan"
            self.plan_path = plan
            self._engine = self._load_or_build(onnx_path, plan, cache_dir, profile)
            self._context = self._engine.create_execution_context()
            self._stream = cuda.Stream()
            self._allocate(profile.max_batch)
        finally:
            self._context_handle.pop()

    def infer(self, inputs: Arrays) -> dict[str, np.ndarray]:
        """Copy in, `execute_async_v3` on this engine's stream, copy out, synchronise."""
        cuda = self._cuda
        batch = len(next(iter(inputs.values())))
        if batch > self.max_batch_size:
            raise EngineError(f"batch {batch} exceeds the profile's max {self.max_batch_size}")
        self._context_handle.push()
        try:
            for name in self._inputs:
                host = self._host[name][:batch]
                np.copyto(host, inputs[name], casting="same_kind")
                cuda.memcpy_htod_async(self._device[name], host, self._stream)
                self._context.set_input_shape(name, host.shape)
            for name in self._names:
                self._context.set_tensor_address(name, int(self._device[name]))
            if not self._context.execute_async_v3(self._stream.handle):
                raise EngineError(f"TensorRT execution of {self.name} failed")
            for name in self._outputs:
                cuda.memcpy_dtoh_async(self._host[name][:batch], self._device[name], self._stream)
            self._stream.synchronize()  # buffers are only valid after this
        finally:
            self._context_handle.pop()
        return {name: self._host[name][:batch].copy() for name in self._outputs}

    def close(self) -> None:
        """Free device buffers and release the primary context."""
        self._context_handle.push()
        try:
            for buffer in self._device.values():
                buffer.free()
            del self._context, self._engine
        finally:
            self._context_handle.pop()
            self._context_handle.detach()

    # -- building -------------------------------------------------------------------------

    def _load_or_build(self, onnx_path: Path, plan: Path, cache_dir: Path, profile: Profile) -> Any:
        runtime = self._trt.Runtime(self._logger)
        if plan.is_file():
            engine = runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is not None:
                return engine
        serialized = self._build(onnx_path, cache_dir, profile)
        cache_dir.mkdir(parents=True, exist_ok=True)
        plan.write_bytes(serialized)
        engine = runtime.deserialize_cuda_engine(serialized)
        if engine is None:
            raise EngineError(f"TensorRT could not deserialise the plan it built for {self.name}")
        return engine

    def _build(self, onnx_path: Path, cache_dir: Path, profile: Profile) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # explicit batch; strongly typed on TensorRT 11
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
        timing_file = cache_dir / "timing.cache"
        timing = config.create_timing_cache(
            timing_file.read_bytes() if timing_file.is_file() else b""
        )
        config.set_timing_cache(timing, False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"TensorRT failed to build an engine for {self.name}")
        cache_dir.mkdir(parents=True, exist_ok=True)
        timing_file.write_bytes(bytes(config.get_timing_cache().serialize()))
        return bytes(serialized)

    def _allocate(self, max_batch: int) -> None:
        trt, cuda = self._trt, self._cuda
        self._names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [
            n for n in self._names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        ]
        self._outputs = [n for n in self._names if n not in self._inputs]
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, Any] = {}
        for name in self._names:
            shape = (max_batch, *tuple(self._engine.get_tensor_shape(name))[1:])
            dtype = trt.nptype(self._engine.get_tensor_dtype(name))
            self._host[name] = cuda.pagelocked_empty(shape, dtype)
            self._device[name] = cuda.mem_alloc(self._host[name].nbytes)

"""Torch backend: the reference implementation, under inference_mode.

On CPU it runs eagerly. On CUDA each batch bucket (1, 8, 64, 256, 1024, ... up to the max
batch) is captured once at load as a CUDA graph over static input and output tensors; a batch
is copied into the smallest bucket that holds it and the graph is replayed, so a batch costs
one launch instead of one per operator. Rows past the batch hold stale but valid inputs; the
models score rows independently, so they never affect the rows that are read back.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np
import torch

from engines.base import Arrays, EngineError
from engines.models import FraudModel, RankingModel, for_serving
from engines.registry import ModelArtifact


def build_module(artifact: ModelArtifact) -> torch.nn.Module:
    """The serving module of `artifact` (what its ONNX file holds), weights loaded, in eval
    mode.
    """
    architecture = artifact.manifest["architecture"]
    config = dict(artifact.manifest["config"])
    module: torch.nn.Module
    if architecture == "FraudModel":
        module = FraudModel(**config)
    elif architecture == "RankingModel":
        config["item_categories"] = torch.zeros(config["items"], dtype=torch.int64)
        module = RankingModel(**config)
    else:
        raise ValueError(f"unknown architecture {architecture!r}")
    state = torch.load(artifact.weights_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    return for_serving(module.eval())


BUCKETS = (1, 8, 64, 256, 1024, 4096)


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `batch` (buckets ascending; batch ≤ the largest)."""
    return buckets[bisect_left(buckets, batch)]


@dataclass(slots=True)
class _Graph:
    """One captured CUDA graph and the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: tuple[torch.Tensor, ...]


class TorchEngine:
    """Runs the torch module on CPU, or on CUDA with one CUDA graph per batch bucket."""

    backend = "torch"

    def __init__(
        self, artifact: ModelArtifact, device: str = "cpu", max_batch_size: int = 4096
    ) -> None:
        """Load `artifact` onto `device`; on CUDA, capture the bucket graphs now."""
        self.name = artifact.name
        self.version = artifact.version
        self.manifest = artifact.manifest
        self.max_batch_size = max_batch_size
        self._device = torch.device(device)
        self.on_gpu = self._device.type == "cuda"
        self._module = build_module(artifact).to(self._device)
        self._outputs: list[str] = list(artifact.manifest["outputs"])
        self._buckets = (*(b for b in BUCKETS if b < max_batch_size), max_batch_size)
        self._graphs: dict[int, _Graph] = {}
        if self._device.type == "cuda":
            for bucket in self._buckets:
                self._graphs[bucket] = self._capture(bucket)

    def infer(self, inputs: Arrays) -> dict[str, np.ndarray]:
        """Run one batch."""
        if self._graphs:
            return self._replay(inputs)
        with torch.inference_mode():
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
            result = self._module(**tensors)
        outputs = result if isinstance(result, tuple) else (result,)
        return {name: tensor.numpy() for name, tensor in zip(self._outputs, outputs, strict=True)}

    def close(self) -> None:
        """Drop the graphs and the module."""
        self._graphs.clear()
        del self._module
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _capture(self, bucket: int) -> _Graph:
        signature = self.manifest["inputs"]
        with torch.inference_mode():
            static = {
                name: torch.zeros(
                    (bucket, *spec["shape"][1:]),
                    dtype=getattr(torch, spec["dtype"]),
                    device=self._device,
                )
                for name, spec in signature.items()
            }
            # Warm up on a side stream first, as torch.cuda.graphs asks.
            side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._module(**static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a hot reload captures on the watcher's thread while the inference
            # thread keeps running CUDA work; "global" would make that work an error.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                result = self._module(**static)
        outputs = result if isinstance(result, tuple) else (result,)
        return _Graph(graph, static, outputs)

    def _replay(self, inputs: Arrays) -> dict[str, np.ndarray]:
        batch = len(next(iter(inputs.values())))
        if batch > self.max_batch_size:
            raise EngineError(f"batch {batch} exceeds the max batch {self.max_batch_size}")
        captured = self._graphs[bucket_for(batch, self._buckets)]
        with torch.inference_mode():
            for name, static in captured.inputs.items():
                static[:batch].copy_(torch.from_numpy(np.ascontiguousarray(inputs[name])))
            captured.graph.replay()
            return {
                name: tensor[:batch].cpu().numpy()
                for name, tensor in zip(self._outputs, captured.outputs, strict=True)
            }

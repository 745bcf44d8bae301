"""ONNX Runtime backend: the CPU default, CUDA when onnxruntime-gpu and a GPU are present."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from engines.base import Arrays, EngineError
from engines.registry import ModelArtifact


class OnnxRuntimeEngine:
    """One InferenceSession per engine; sessions are thread-safe for `run`."""

    backend = "onnxruntime"

    def __init__(
        self, artifact: ModelArtifact, threads: int = 1, max_batch_size: int = 4096
    ) -> None:
        """Load `artifact` with `threads` intra-op threads and no spinning (the consumer
        shares these cores).
        """
        self.name = artifact.name
        self.version = artifact.version
        self.manifest = artifact.manifest
        self.max_batch_size = max_batch_size
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self._session = ort.InferenceSession(
                str(artifact.onnx_path), sess_options=options, providers=providers
            )
        except Exception as exc:
            raise EngineError(f"onnxruntime could not load {artifact.onnx_path}: {exc}") from exc
        self.providers: list[str] = self._session.get_providers()
        self.on_gpu = self.providers[0] != "CPUExecutionProvider"
        self._outputs = [output.name for output in self._session.get_outputs()]

    def infer(self, inputs: Arrays) -> dict[str, np.ndarray]:
        """Run one batch."""
        results = self._session.run(self._outputs, dict(inputs))
        return dict(zip(self._outputs, results, strict=True))

    def close(self) -> None:
        """Drop the session."""
        del self._session

"""Torch backend: the reference implementation, eager under inference_mode."""

from __future__ import annotations

import numpy as np
import torch

from engines.base import Arrays
from engines.models import FraudModel, RankingModel
from engines.registry import ModelArtifact


def build_module(artifact: ModelArtifact) -> torch.nn.Module:
    """The torch module of `artifact`, weights loaded, in eval mode."""
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
    return module.eval()


class TorchEngine:
    """Runs the torch module on CPU (or CUDA when asked and present)."""

    backend = "torch"

    def __init__(
        self, artifact: ModelArtifact, device: str = "cpu", max_batch_size: int = 4096
    ) -> None:
        """Load `artifact` onto `device`."""
        self.name = artifact.name
        self.version = artifact.version
        self.manifest = artifact.manifest
        self.max_batch_size = max_batch_size
        self._device = torch.device(device)
        self._module = build_module(artifact).to(self._device)
        self._outputs: list[str] = list(artifact.manifest["outputs"])

    def infer(self, inputs: Arrays) -> dict[str, np.ndarray]:
        """Run one batch."""
        with torch.inference_mode():
            tensors = {
                k: torch.from_numpy(np.ascontiguousarray(v)).to(self._device)
                for k, v in inputs.items()
            }
            result = self._module(**tensors)
        outputs = result if isinstance(result, tuple) else (result,)
        return {
            name: tensor.cpu().numpy() for name, tensor in zip(self._outputs, outputs, strict=True)
        }

    def close(self) -> None:
        """Drop the module."""
        del self._module

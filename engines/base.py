"""The engine protocol every backend implements: load, infer a batch, close."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from schemas.errors import StreamscoreError

Arrays = Mapping[str, np.ndarray]


class EngineError(StreamscoreError, RuntimeError):
    """An engine could not be built, loaded or run."""


class Engine(Protocol):
    """A loaded model on one backend. Batch splitting and padding live with the caller."""

    name: str
    version: str
    backend: str
    on_gpu: bool  # runs on a GPU (the device `engines bench` reports)
    max_batch_size: int
    manifest: dict[str, Any]

    def infer(self, inputs: Arrays) -> dict[str, np.ndarray]:
        """Outputs by name for one batch of inputs by name (batch axis first)."""
        ...

    def close(self) -> None:
        """Release what the engine holds."""
        ...

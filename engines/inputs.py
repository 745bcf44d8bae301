"""Random but valid engine inputs, from a model's manifest: for benchmarks and tests."""

from __future__ import annotations

import numpy as np

from engines.registry import ModelArtifact
from engines.vocabulary import map_item_ids


def random_inputs(
    artifact: ModelArtifact, batch: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """A batch of inputs matching `artifact`'s signature; ids include unknown and padding."""
    manifest = artifact.manifest
    inputs: dict[str, np.ndarray] = {}
    for name, spec in manifest["inputs"].items():
        shape = (batch, *spec["shape"][1:])
        if spec["dtype"] == "float32":
            inputs[name] = rng.normal(size=shape).astype(np.float32)
        elif name == "categorical":
            cards = manifest["config"]["cardinalities"]
            inputs[name] = np.stack([rng.integers(0, c, size=batch) for c in cards], axis=1)
        else:
            key = "category_vocabulary" if name == "history_categories" else "item_vocabulary"
            vocabulary = int(manifest[key])
            inputs[name] = map_item_ids(rng.integers(-1, vocabulary * 2, size=shape), vocabulary)
    return inputs

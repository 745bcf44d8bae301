"""Versioned model directories.

Layout: `<model_dir>/<name>/<version>/{model.onnx, weights.pt, manifest.json}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.base import EngineError

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.pt"


@dataclass(frozen=True, slots=True)
class ModelArtifact:
    """One trained model version on disk and its manifest."""

    name: str
    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        """The exported ONNX graph."""
        return self.path / ONNX_FILE

    @property
    def weights_path(self) -> Path:
        """The torch state dict."""
        return self.path / WEIGHTS_FILE


def versions(model_dir: Path, name: str) -> list[str]:
    """Versions of `name` with a manifest, oldest first."""
    root = model_dir / name
    if not root.is_dir():
        return []
    found = [child.name for child in root.iterdir() if (child / MANIFEST).is_file()]
    return sorted(found, key=lambda v: (len(v), v))


def resolve(model_dir: Path, name: str, version: str = "latest") -> ModelArtifact:
    """The artifact of `name` at `version` ("latest" picks the newest)."""
    available = versions(model_dir, name)
    if not available:
        raise EngineError(
            f"no versions of model {name!r} under {model_dir}; run `streamscore train`"
        )
    chosen = available[-1] if version == "latest" else version
    if chosen not in available:
        raise EngineError(f"model {name!r} has no version {version!r}; have {available}")
    path = model_dir / name / chosen
    manifest = json.loads((path / MANIFEST).read_text())
    return ModelArtifact(name=name, version=chosen, path=path, manifest=manifest)


def next_version_dir(model_dir: Path, name: str) -> tuple[str, Path]:
    """A fresh version number and its (created) directory."""
    existing = [int(v) for v in versions(model_dir, name) if v.isdigit()]
    version = str(max(existing, default=0) + 1)
    path = model_dir / name / version
    path.mkdir(parents=True, exist_ok=False)
    return version, path


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest last, so a half-written version is never picked up."""
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))

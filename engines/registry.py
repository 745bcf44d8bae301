"""Versioned model directories.

Layout: `<model_dir>/<name>/<version>/{model.onnx, weights.pt, manifest.json}`.

A version's manifest names its role: `champion` (the default: it may serve, and `latest`
is the newest champion) or `challenger` (trained by `streamscore retrain`; shadow-scored
only, until `promote` makes it a champion).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.base import EngineError

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.pt"
CHAMPION, CHALLENGER = "champion", "challenger"


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


def versions(model_dir: Path, name: str, role: str | None = CHAMPION) -> list[str]:
    """Versions of `name` with a whole manifest and in `role` (None: any), oldest first."""
    root = model_dir / name
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        manifest = _read_manifest(child)
        if manifest is not None and (role is None or role_of(manifest) == role):
            found.append(child.name)
    return sorted(found, key=lambda v: (len(v), v))


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of the version at `path`; None while it has none, or none whole.

    A writer that does not rename it into place (an older `train`, a hand copy) leaves it
    empty or cut short for a moment: the version does not count until it parses, rather
    than failing the reader (the reload watcher runs inside the serving loop).
    """
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None  # no manifest (yet)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # not whole yet, or damaged
    return manifest if isinstance(manifest, dict) else None


def role_of(manifest: dict[str, Any]) -> str:
    """A manifest's role; versions from before roles are champions."""
    return str(manifest.get("role", CHAMPION))


def resolve(model_dir: Path, name: str, version: str = "latest") -> ModelArtifact:
    """The artifact of `name` at `version` ("latest" picks the newest)."""
    available = versions(model_dir, name)
    if not available:
        raise EngineError(
            f"no versions of model {name!r} under {model_dir}; run `streamscore train`"
        )
    chosen = available[-1] if version == "latest" else version
    if chosen not in versions(model_dir, name, role=None):
        raise EngineError(f"model {name!r} has no version {version!r}; have {available}")
    path = model_dir / name / chosen
    manifest = _read_manifest(path)
    if manifest is None:  # removed since it was listed
        raise EngineError(f"model {name!r} version {chosen!r} has no manifest any more")
    return ModelArtifact(name=name, version=chosen, path=path, manifest=manifest)


def next_version_dir(model_dir: Path, name: str) -> tuple[str, Path]:
    """A fresh version number and its (created) directory."""
    existing = [int(v) for v in versions(model_dir, name, role=None) if v.isdigit()]
    version = str(max(existing, default=0) + 1)
    path = model_dir / name / version
    path.mkdir(parents=True, exist_ok=False)
    return version, path


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest last, and whole (renamed into place), so a half-written version
    is never picked up.
    """
    write_atomic(path / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


def promote(model_dir: Path, name: str, version: str, record: dict[str, Any]) -> ModelArtifact:
    """Make challenger `version` a champion, with `record` (why, and its figures) in its
    manifest. The manifest is replaced atomically, so a reader sees the old one or the new
    one; the reload watcher then serves it as the newest champion.
    """
    artifact = resolve(model_dir, name, version)
    if role_of(artifact.manifest) != CHALLENGER:
        raise EngineError(f"model {name!r} version {version!r} is not a challenger")
    manifest = artifact.manifest | {"role": CHAMPION, "promotion": record}
    write_manifest(artifact.path, manifest)
    return ModelArtifact(name, version, artifact.path, manifest)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one.

    Replicas share the engine cache (`/engines`), so each writer fills a temporary file of its
    own beside `path` and renames it into place: two replicas writing the same artefact at
    once leave one whole file, and a crash leaves no half-written one under the real name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

"""Publishing a model version the way `streamscore train` does: files first, manifest last."""

import json
import shutil

from engines.registry import MANIFEST, resolve


def publish_copy(model_dir, name, onnx_bytes=None):
    """Copy the newest version of `name` as the next one, manifest last; return its version."""
    source = resolve(model_dir, name)
    version = str(int(source.version) + 1)
    target = model_dir / name / version
    shutil.copytree(source.path, target, ignore=shutil.ignore_patterns(MANIFEST))
    if onnx_bytes is not None:
        (target / "model.onnx").write_bytes(onnx_bytes)
    (target / MANIFEST).write_text(json.dumps(source.manifest | {"version": version}))
    return version

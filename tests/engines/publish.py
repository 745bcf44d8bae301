"""Publishing a model version the way `streamscore train` does: files first, manifest last."""

import json
import shutil

from engines.registry import MANIFEST, next_version_dir, resolve


def publish_copy(model_dir, name, onnx_bytes=None, role="champion"):
    """Copy the newest version of `name` as the next one in `role`, manifest last; return its
    version.
    """
    source = resolve(model_dir, name)
    version, _ = next_version_dir(model_dir, name)
    target = model_dir / name / version
    shutil.copytree(
        source.path, target, ignore=shutil.ignore_patterns(MANIFEST), dirs_exist_ok=True
    )
    if onnx_bytes is not None:
        (target / "model.onnx").write_bytes(onnx_bytes)
    manifest = source.manifest | {"version": version, "role": role}
    (target / MANIFEST).write_text(json.dumps(manifest))
    return version

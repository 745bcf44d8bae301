"""ONNX export with a dynamic batch axis only, a pinned opset, and a checked graph; and the
FP16 variant TensorRT builds from when `engine.precision = "fp16"`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch

from engines.base import EngineError

OPSET = 18
BATCH = "batch"
FP16_SUFFIX = ".fp16.onnx"


def export_onnx(
    module: torch.nn.Module,
    example: Mapping[str, torch.Tensor],
    output_names: list[str],
    path: Path,
) -> str:
    """Export `module` called with `example` (keyword inputs, batch ≥ 2) to `path`; return
    the file's SHA-256.
    """
    module.eval()
    names = list(example)
    dynamic = {name: {0: torch.export.Dim(BATCH, min=1, max=65536)} for name in names}
    torch.onnx.export(
        module,
        args=(),
        kwargs=dict(example),
        f=str(path),
        input_names=names,
        output_names=output_names,
        dynamic_shapes=dynamic,
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return file_sha256(path)


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


def fp16_onnx(onnx_path: Path, cache_dir: Path) -> Path:
    """The FP16 variant of `onnx_path`, made once with ModelOpt AutoCast into `cache_dir`.

    It is a derived artefact, so it goes to the engine cache, never beside the model: the
    model directory is mounted read-only in production. It is named by the source's hash, so
    versions never mix, and written atomically, so replicas sharing the cache do not race.

    TensorRT 11 has no builder precision flags: reduced precision must be in the ONNX file.
    AutoCast keeps nodes whose values overflow FP16 (the -1e4 attention mask, for one) in
    FP32 and keeps the inputs and outputs FP32, so callers see the same signature.
    """
    target = cache_dir / f"{file_sha256(onnx_path)[:24]}{FP16_SUFFIX}"
    if target.is_file():
        return target
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise EngineError(
            "precision fp16 needs nvidia-modelopt[onnx] (in the `gpu` extra)"
        ) from exc
    model = convert_to_mixed_precision(
        onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True
    )
    onnx.checker.check_model(model, full_check=True)
    write_atomic(target, model.SerializeToString())
    return target

"""ONNX export with a dynamic batch axis only, a pinned opset, and a checked graph; and the
FP16 variant TensorRT builds from when `engine.precision = "fp16"`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch

from engines.base import EngineError

OPSET = 18
BATCH = "batch"
FP16_FILE = "model.fp16.onnx"


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


def fp16_onnx(onnx_path: Path) -> Path:
    """The FP16 variant of `onnx_path`, made once beside it with ModelOpt AutoCast.

    TensorRT 11 has no builder precision flags: reduced precision must be in the ONNX file.
    AutoCast keeps nodes whose values overflow FP16 (the -1e4 attention mask, for one) in
    FP32 and keeps the inputs and outputs FP32, so callers see the same signature.
    """
    target = onnx_path.with_name(FP16_FILE)
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
    partial = target.with_suffix(".partial")
    onnx.save(model, str(partial))
    partial.replace(target)  # readers never see a half-written file
    return target

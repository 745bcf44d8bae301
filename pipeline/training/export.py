"""ONNX export with a dynamic batch axis only, a pinned opset, and a checked graph."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import onnx
import torch

from engines.registry import file_sha256

OPSET = 18
BATCH = "batch"


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

"""Engine settings: which models serve, from where, and on which backend.

They live here, not in `pipeline.settings`, so that engines import nothing from the
pipeline; `pipeline.settings.Settings` holds them as its `engines` section.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Backend(StrEnum):
    """Inference backends; `auto` prefers TensorRT on a GPU, else ONNX Runtime."""

    AUTO = "auto"
    TENSORRT = "tensorrt"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"


class ModelPin(_Frozen):
    """One served model: its role, name, pinned version and largest inference batch."""

    role: Literal["fraud", "ranking"]
    name: str
    version: str
    max_batch: int


class EngineSettings(_Frozen):
    """Which models serve, from where, and on which backend.

    A version is a number, or `latest`: then a newer version that appears in `model_dir` is
    loaded in the background and swapped in between batches (checked every
    `reload_interval_s`; 0 turns it off). A pinned number never changes while running.
    """

    backend: Backend = Backend.AUTO
    model_dir: Path = Path("var/models")
    engine_cache_dir: Path = Path("var/engines")
    precision: Literal["fp32", "fp16"] = Field(
        default="fp32",
        description="TensorRT only: fp16 builds from an FP16 ONNX made by ModelOpt AutoCast.",
    )
    fraud_model: str = "fraud"
    fraud_version: str = "latest"
    fraud_max_batch: PositiveInt = 1024
    ranking_model: str = "ranking"
    ranking_version: str = "latest"
    ranking_max_batch: PositiveInt = Field(
        default=64,
        description="Rows per ranking call; 64 keeps the (B, C, d) working set in a CPU's L2.",
    )
    reload_interval_s: Annotated[float, Field(ge=0)] = 5.0
    shadow: bool = Field(
        default=True,
        description="Also score every event with the newest fraud challenger newer than the "
        "serving champion (found like a reload), to topics.shadow_scores; it never decides.",
    )
    threads: PositiveInt = 1

    def pins(self) -> tuple[ModelPin, ModelPin]:
        """The fraud and ranking models this process serves."""
        return (
            ModelPin(
                role="fraud",
                name=self.fraud_model,
                version=self.fraud_version,
                max_batch=self.fraud_max_batch,
            ),
            ModelPin(
                role="ranking",
                name=self.ranking_model,
                version=self.ranking_version,
                max_batch=self.ranking_max_batch,
            ),
        )

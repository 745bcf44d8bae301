"""`engines build` on the CPU backends: every pinned engine loads and passes its check."""

import shutil

import pytest

from engines.base import EngineError
from engines.build import build_engines
from engines.settings import EngineSettings
from tests.engines.publish import publish_copy


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_build_checks_every_pinned_engine(model_dir, backend):
    steps = []
    settings = EngineSettings(model_dir=model_dir, backend=backend, ranking_max_batch=32)
    results = build_engines(settings, step=lambda done, what: steps.append(done))
    assert [(r.model, r.backend, r.max_batch) for r in results] == [
        ("fraud", backend, 1024),
        ("ranking", backend, 32),
    ]
    assert steps == [0, 1, 2]


def test_a_broken_model_fails_the_build_instead_of_falling_back(model_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    publish_copy(models, "ranking", onnx_bytes=b"broken")
    with pytest.raises(EngineError, match="onnxruntime could not load"):
        build_engines(EngineSettings(model_dir=models, backend="onnxruntime"))

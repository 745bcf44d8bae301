"""The package layout's promises: dependencies between top-level packages run one way, and the
serving path runs without the training stack.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The top-level packages each may import: schemas is a leaf, engines knows only schemas, and
# pipeline drives both.
ALLOWED = {"schemas": set(), "engines": {"schemas"}, "pipeline": {"schemas", "engines"}}
# What the `train` extra adds; a default (serving) install has none of them.
TRAINING_ONLY = ("torch", "onnx", "onnxscript", "matplotlib", "psutil", "pyinstrument")


def _imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_top_level_packages_import_each_other_one_way_only(package):
    forbidden = set(ALLOWED) - ALLOWED[package] - {package}
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & forbidden)
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


# Walls inside `pipeline`: the folder on the left imports nothing under the modules on the
# right (issue #42). Serving runs without the monitor, the tools and training; the monitor
# reads the pipeline's topics, not its stages; state knows nothing of the features folded
# into it; the Kafka layer knows nothing of the application built on it.
WALLS = {
    "pipeline/serve": ("pipeline.monitor", "pipeline.tools", "pipeline.training", "pipeline.cli"),
    "pipeline/monitor": ("pipeline.serve",),
    "pipeline/serve/state": ("pipeline.serve.features",),
    "pipeline/kafka": ("pipeline.serve", "pipeline.monitor", "pipeline.tools", "pipeline.cli"),
}


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


@pytest.mark.parametrize("folder", sorted(WALLS))
def test_walls_inside_the_pipeline_package_hold(folder):
    walled = WALLS[folder]
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in _imported_modules(path) if m.startswith(walled)
        )
        for path in sorted((ROOT / folder).rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_walls_test_sees_a_forbidden_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from pipeline.serve.features import fold\nimport pipeline.monitor.service\n")
    assert {"pipeline.serve.features", "pipeline.monitor.service"} <= _imported_modules(module)


def test_the_serving_path_loads_and_scores_without_the_training_stack(model_dir):
    # A fresh interpreter in which importing any training-only package fails, as in an
    # install without the `train` extra: the CLI, the runner and both engines on the `auto`
    # backend must still load and score.
    script = textwrap.dedent(
        f"""
        import sys
        for name in {TRAINING_ONLY!r}:
            sys.modules[name] = None
        from pathlib import Path

        import numpy as np
        from typer.testing import CliRunner

        import pipeline.serve.runner
        from engines.factory import load_engine
        from engines.inputs import random_inputs
        from engines.registry import resolve
        from engines.settings import EngineSettings
        from pipeline.cli import app

        result = CliRunner().invoke(app, ["run", "--help"])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(app, ["train", "--model-dir", "unused"])
        assert result.exit_code == 2, result.output
        assert "pip install 'streamscore[train]'" in result.output, result.output
        settings = EngineSettings(model_dir=Path({str(model_dir)!r}))
        for pin in settings.pins():
            engine = load_engine(pin, settings)
            assert engine.backend == "onnxruntime", engine.backend
            artifact = resolve(settings.model_dir, pin.name, pin.version)
            inputs = random_inputs(artifact, 8, np.random.default_rng(0))
            outputs = engine.infer(inputs)
            assert all(len(value) == 8 for value in outputs.values()), outputs
            engine.close()
        loaded = sorted(name for name in {TRAINING_ONLY!r} if sys.modules.get(name))
        assert not loaded, loaded
        print("served without", {TRAINING_ONLY!r})
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "served without" in done.stdout

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
    # The Kafka layer takes connection settings and explicit names, never the whole Settings,
    # and knows nothing of the topic catalogue above it.
    "pipeline/kafka": (
        "pipeline.serve",
        "pipeline.monitor",
        "pipeline.tools",
        "pipeline.cli",
        "pipeline.topics",
        "pipeline.settings.Settings",
    ),
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


def test_every_exception_streamscore_defines_derives_from_one_base():
    # Issue #42: one base to catch; `Rewind` is control flow and stays outside on purpose.
    import importlib
    import inspect
    import pkgutil

    from schemas.errors import StreamscoreError

    outside = []
    for package in ("schemas", "engines", "pipeline"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if info.name.startswith("pipeline.cli") or info.name.endswith("__main__"):
                continue  # the command line defines none, and importing it builds the app
            try:
                module = importlib.import_module(info.name)
            except ModuleNotFoundError as missing:  # an optional extra: quixstreams, tensorrt
                assert missing.name in OPTIONAL, missing
                outside += _exception_classes(info.name)
                continue
            for name, value in vars(module).items():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == module.__name__
                    and not issubclass(value, StreamscoreError)
                ):
                    outside.append(f"{module.__name__}.{name}")
    assert outside == ["pipeline.serve.commit.Rewind"]


OPTIONAL = ("quixstreams", "tensorrt", "pycuda")  # not installed by the dev extra


def _exception_classes(module: str) -> list[str]:
    """Classes a module that cannot be imported here defines on a builtin exception."""
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    return [
        f"{module}.{node.name}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(
            isinstance(base, ast.Name) and base.id.endswith(("Error", "Exception"))
            for base in node.bases
        )
        and not any(isinstance(b, ast.Name) and b.id == "StreamscoreError" for b in node.bases)
    ]

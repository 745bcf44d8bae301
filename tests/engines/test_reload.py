"""ModelWatcher on real model directories: newer versions load off the hot path, once."""

import shutil
import time

import pytest

from engines.registry import versions
from engines.reload import ModelWatcher
from pipeline.settings import EngineSettings
from tests.engines.publish import publish_copy


@pytest.fixture
def models(tmp_path, model_dir):
    copy = tmp_path / "models"
    shutil.copytree(model_dir, copy)
    return copy


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def settings_for(models, **overrides):
    return EngineSettings(model_dir=models, backend="onnxruntime", reload_interval_s=5, **overrides)


def drain(watcher, clock):
    """Poll until the load in flight finishes (it runs on the watcher's thread)."""
    for _ in range(400):
        ready = watcher.poll()
        if ready:
            return ready
        clock.now += 0.01
        time.sleep(0.01)
    return []


def test_a_newer_version_is_loaded_in_the_background_and_offered_once(models):
    clock = Clock()
    serving = {"fraud": versions(models, "fraud")[-1], "ranking": versions(models, "ranking")[-1]}
    watcher = ModelWatcher(settings_for(models), serving, clock)
    try:
        assert watcher.poll() == []
        version = publish_copy(models, "fraud")
        assert watcher.poll() == []  # not due: the directory is listed every 5 s only
        clock.now = 5.0
        assert watcher.poll() == []  # starts the load; a later poll collects it
        assert watcher.loading() == {"fraud": version}
        [(role, engine)] = drain(watcher, clock)
        assert (role, engine.name, engine.version) == ("fraud", "fraud", version)
        watcher.swapped(role, engine.version)
        engine.close()
        clock.now = 20.0
        assert watcher.poll() == []
    finally:
        watcher.close()


def test_a_version_that_fails_to_load_is_refused_and_not_retried(models):
    clock = Clock()
    serving = {"fraud": versions(models, "fraud")[-1], "ranking": versions(models, "ranking")[-1]}
    watcher = ModelWatcher(settings_for(models), serving, clock)
    try:
        publish_copy(models, "ranking", onnx_bytes=b"not an onnx graph")
        clock.now = 5.0
        assert drain(watcher, clock) == []
        clock.now = 30.0
        assert watcher.poll() == []
        assert watcher.loading() == {}
    finally:
        watcher.close()


def test_a_pinned_version_never_reloads(models):
    clock = Clock()
    pinned = versions(models, "fraud")[-1]
    settings = settings_for(models, fraud_version=pinned, ranking_version="1")
    watcher = ModelWatcher(settings, {"fraud": pinned, "ranking": "1"}, clock)
    try:
        publish_copy(models, "fraud")
        publish_copy(models, "ranking")
        clock.now = 10.0
        assert watcher.poll() == []
        assert watcher.loading() == {}
    finally:
        watcher.close()

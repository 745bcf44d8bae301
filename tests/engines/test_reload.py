"""ModelWatcher on real model directories: newer versions load off the hot path, once."""

import errno
import shutil
import time

import pytest
from structlog.testing import capture_logs

import engines.reload
from engines.registry import promote, versions
from engines.reload import ModelWatcher
from engines.settings import EngineSettings
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


def drain(watcher, timeout_s=60):
    """Poll until the load due or in flight is collected (it runs on the watcher's thread);
    the clock stands still, so no other load starts meanwhile.
    """
    deadline = time.monotonic() + timeout_s
    ready = watcher.poll()
    while watcher.loading():
        assert time.monotonic() < deadline, f"still loading {watcher.loading()} after {timeout_s}s"
        time.sleep(0.01)
        ready += watcher.poll()
    return ready


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
        [(role, engine)] = drain(watcher)
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
        version = publish_copy(models, "ranking", onnx_bytes=b"not an onnx graph")
        clock.now = 5.0
        assert watcher.poll() == []  # starts the load
        assert watcher.loading() == {"ranking": version}
        assert drain(watcher) == []  # it failed: refused, not offered
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


def test_removing_the_newest_version_rolls_back_to_the_one_before(models):
    """docs/operations.md's rollback: the watcher serves what is newest in the directory."""
    clock = Clock()
    previous = versions(models, "fraud")[-1]
    bad = publish_copy(models, "fraud")
    serving = {"fraud": bad, "ranking": versions(models, "ranking")[-1]}
    watcher = ModelWatcher(settings_for(models), serving, clock)
    try:
        shutil.move(models / "fraud" / bad, models / f"fraud-{bad}-withdrawn")
        clock.now = 5.0
        watcher.poll()
        [(role, engine)] = drain(watcher)
        assert (role, engine.version) == ("fraud", previous)
        engine.close()
    finally:
        watcher.close()


def test_a_model_volume_that_cannot_be_read_is_logged_and_looked_at_again(models, monkeypatch):
    # The watcher runs inside the serving loop: an unreachable model volume must not stop
    # scoring with the engines already loaded.
    clock = Clock()
    serving = {"fraud": versions(models, "fraud")[-1], "ranking": versions(models, "ranking")[-1]}
    watcher = ModelWatcher(settings_for(models), serving, clock)
    try:
        version = publish_copy(models, "fraud")

        def unreachable(*_args, **_kwargs):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(engines.reload, "versions", unreachable)
        clock.now = 5.0
        with capture_logs() as logs:
            assert watcher.poll() == []
        assert [e["event"] for e in logs] == ["model_watch_failed"]
        assert watcher.loading() == {}
        monkeypatch.undo()
        clock.now = 10.0
        [(role, engine)] = drain(watcher)
        assert (role, engine.version) == ("fraud", version)
        engine.close()
    finally:
        watcher.close()


def test_the_newest_challenger_is_shadowed_until_it_is_promoted(models):
    clock = Clock()
    champion = versions(models, "fraud")[-1]
    serving = {"fraud": champion, "ranking": versions(models, "ranking")[-1]}
    older = publish_copy(models, "fraud", role="challenger")
    newest = publish_copy(models, "fraud", role="challenger")
    watcher = ModelWatcher(settings_for(models), serving, clock)
    try:
        clock.now = 5.0
        watcher.poll()
        assert watcher.loading() == {"shadow": newest}  # the newest challenger only
        [(role, engine)] = drain(watcher)
        assert (role, engine.version) == ("shadow", newest) and int(older) < int(newest)
        watcher.swapped("shadow", engine.version)
        engine.close()
        clock.now = 10.0
        assert watcher.poll() == [] and watcher.loading() == {}  # shadowed already
        promote(models, "fraud", newest, {"reason": "test"})
        clock.now = 15.0
        ready = watcher.poll()
        # The champion role loads it; the shadow stops (no challenger newer than it).
        assert ready == [("shadow", None)] and watcher.loading() == {"fraud": newest}
        watcher.swapped("shadow", None)
        [(role, engine)] = drain(watcher)
        assert (role, engine.version) == ("fraud", newest)
        watcher.swapped("fraud", newest)
        engine.close()
        clock.now = 20.0
        assert watcher.poll() == [] and watcher.loading() == {}  # older is not newer
    finally:
        watcher.close()


def test_no_shadow_when_turned_off(models):
    clock = Clock()
    serving = {"fraud": versions(models, "fraud")[-1], "ranking": versions(models, "ranking")[-1]}
    publish_copy(models, "fraud", role="challenger")
    watcher = ModelWatcher(settings_for(models, shadow=False), serving, clock)
    try:
        clock.now = 5.0
        assert watcher.poll() == [] and watcher.loading() == {}
    finally:
        watcher.close()

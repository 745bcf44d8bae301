"""Model reload without a restart: watch the model directory for newer versions.

Only models pinned to `latest` reload. Every `reload_interval_s` the watcher lists the model
directory (a version counts once its manifest exists, and the manifest is written last),
loads a newer version on a background thread, and hands the loaded engine to the pipeline,
which swaps it in between two batches. So each event is scored by exactly one version, which
its output names, and the hot path never waits for a load or an engine build.

With `engine.shadow`, the watcher also follows the fraud model's challengers: the newest
challenger newer than the serving champion is loaded in the role `shadow` (and `None` is
offered for it once there is none, after a promotion say), for the pipeline to shadow-score
with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import structlog

from engines.base import Engine
from engines.factory import load_engine
from engines.registry import CHALLENGER, versions
from engines.settings import EngineSettings, ModelPin

log = structlog.get_logger("streamscore.engines")


class ModelWatcher:
    """Finds and loads newer versions of the `latest`-pinned models, one load at a time."""

    def __init__(
        self,
        settings: EngineSettings,
        serving: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Watch for versions newer than `serving` (role → version now in use)."""
        self._settings = settings
        self._pins: dict[str, ModelPin] = {
            pin.role: pin for pin in settings.pins() if pin.version == "latest"
        }
        self._fraud = settings.pins()[0]
        self._serving: dict[str, str | None] = {"shadow": None, **serving}
        self._clock = clock
        self._next_check = clock() + settings.reload_interval_s
        self._refused: set[tuple[str, str]] = set()
        self._loading: dict[str, tuple[str, Future[Engine]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-reload")

    def poll(self) -> list[tuple[str, Engine | None]]:
        """Engines loaded and ready to swap in, by role (None: stop shadow-scoring); cheap
        enough to call every batch.
        """
        ready: list[tuple[str, Engine | None]] = list(self._collect())
        interval = self._settings.reload_interval_s
        watching = self._pins or self._settings.shadow
        if interval > 0 and watching and self._clock() >= self._next_check:
            self._next_check = self._clock() + interval
            try:
                self._look()
                if self._settings.shadow and self._look_shadow():
                    ready.append(("shadow", None))
            except OSError as exc:  # the model volume unreadable: serve on, look again later
                log.warning("model_watch_failed", error=str(exc))
        return ready

    def loading(self) -> dict[str, str]:
        """Versions being loaded now, by role."""
        return {role: version for role, (version, _) in self._loading.items()}

    def swapped(self, role: str, version: str | None) -> None:
        """The pipeline now serves `version` for `role` (None: no shadow)."""
        self._serving[role] = version

    def refuse(self, role: str, version: str) -> None:
        """Never offer `version` for `role` again (it failed to load or was rejected)."""
        self._refused.add((role, version))

    def close(self) -> None:
        """Stop watching; wait for a load in flight and close what it loaded."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for _, future in self._loading.values():
            if not future.cancelled() and future.exception() is None:
                future.result().close()
        self._loading.clear()

    def _look(self) -> None:
        for role, pin in self._pins.items():
            if role in self._loading:
                continue
            available = versions(self._settings.model_dir, pin.name)
            newest = available[-1] if available else None
            if newest is None or newest == self._serving[role] or (role, newest) in self._refused:
                continue
            log.info("model_reload_started", role=role, model=pin.name, version=newest)
            future = self._pool.submit(load_engine, pin, self._settings, newest)
            self._loading[role] = (newest, future)

    def _look_shadow(self) -> bool:
        """Start loading the challenger to shadow-score with, when it changed; True when
        there is none any more and one is shadowing.
        """
        if "shadow" in self._loading:
            return False
        model_dir, name = self._settings.model_dir, self._fraud.name
        # Newer than the champion served, and than one just promoted and still loading.
        champions = [self._serving["fraud"], *versions(model_dir, name)[-1:]]
        newer = [
            version
            for version in versions(model_dir, name, role=CHALLENGER)
            if all(_newer(version, champion) for champion in champions)
        ]
        target = newer[-1] if newer else None
        current = self._serving["shadow"]
        if target is None:
            return current is not None
        if target == current or ("shadow", target) in self._refused:
            return False
        log.info("model_shadow_load_started", model=self._fraud.name, version=target)
        future = self._pool.submit(load_engine, self._fraud, self._settings, target)
        self._loading["shadow"] = (target, future)
        return False

    def _collect(self) -> list[tuple[str, Engine]]:
        ready = []
        for role, (version, future) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[role]
            error = future.exception()
            if error is not None:
                log.warning("model_reload_failed", role=role, version=version, error=str(error))
                self.refuse(role, version)
                continue
            ready.append((role, future.result()))
        return ready


def _newer(version: str, than: str | None) -> bool:
    """Whether numbered `version` comes after `than` (numbered versions only)."""
    return than is not None and version.isdigit() and than.isdigit() and int(version) > int(than)

"""The serving versions while running: a newer version the model watcher loaded is swapped
in between batches, a challenger is shadow-scored (and stopped if it fails a batch), and
an engine swapped out closes only once no batch in flight holds it.
"""

from __future__ import annotations

from collections.abc import Callable

from engines.base import Engine, EngineError
from engines.reload import ModelWatcher
from pipeline.logging import get_logger
from pipeline.serve.score import Request, Scorer
from pipeline.telemetry import Telemetry

log = get_logger()


class ModelSwaps:
    """The watcher's offers applied to the scorer, with their metrics and log lines."""

    def __init__(self, scorer: Scorer, watcher: ModelWatcher, telemetry: Telemetry) -> None:
        """Swap engines into `scorer` as `watcher` offers them."""
        self._scorer = scorer
        self._watcher = watcher
        self.telemetry = telemetry
        # Challengers that failed mid-batch: closed at the end, when no batch can hold them.
        self._retired: list[Engine] = []

    def describe(self, role: str, engine: Engine) -> None:
        """Say which model, version and backend serves `role` (`streamscore_engine_info`)."""
        self.telemetry.engine.labels(role=role).info(
            {"model": engine.name, "version": engine.version, "backend": engine.backend}
        )

    def poll(self, settle: Callable[[], None]) -> None:
        """Between batches, serve any newer model version the watcher has loaded. Batches
        in flight keep the engines they were prepared with, so the old ones close only
        after `settle` has finished (or, after a rollback, dropped) those batches.
        """
        retired: list[Engine] = []
        for role, engine in self._watcher.poll():
            if role == "shadow":
                retired.extend(self._swap_shadow(engine))
                continue
            assert engine is not None  # only the shadow role is ever offered None
            try:
                old = self._scorer.swap(role, engine)
            except EngineError as exc:
                log.warning(
                    "model_reload_rejected", role=role, version=engine.version, error=str(exc)
                )
                self._watcher.refuse(role, engine.version)
                engine.close()
                continue
            self._watcher.swapped(role, engine.version)
            self.describe(role, engine)
            log.info(
                "model_swapped",
                role=role,
                model=engine.name,
                old_version=old.version,
                new_version=engine.version,
                backend=engine.backend,
            )
            retired.append(old)
        if retired:
            try:
                settle()  # no batch in flight may hold an engine that closes
            finally:
                for old in retired:
                    old.close()

    def _swap_shadow(self, engine: Engine | None) -> list[Engine]:
        """Shadow-score with `engine` (None: stop) from the next batch; what it retires."""
        try:
            old = self._scorer.swap_shadow(engine)
        except EngineError as exc:
            assert engine is not None
            log.warning("model_shadow_rejected", version=engine.version, error=str(exc))
            self._watcher.refuse("shadow", engine.version)
            engine.close()
            return []
        version = None if engine is None else engine.version
        self._watcher.swapped("shadow", version)
        log.info(
            "model_shadow_swapped",
            old_version=None if old is None else old.version,
            new_version=version,
        )
        return [] if old is None else [old]

    def stop_failed_shadow(self, request: Request, error: str) -> None:
        """A challenger that failed to score a batch is shadowed no longer (the batch's own
        scores are whole); it is not loaded again.
        """
        shadow = request.shadow
        if shadow is None or self._scorer.shadow is not shadow:
            return  # already replaced
        log.warning("model_shadow_failed", version=shadow.version, error=error)
        self._scorer.swap_shadow(None)
        self._watcher.refuse("shadow", shadow.version)
        self._watcher.swapped("shadow", None)
        self._retired.append(shadow)

    def close(self) -> None:
        """Stop watching, and close every engine: those serving and those retired."""
        self._watcher.close()
        self._scorer.fraud.close()
        self._scorer.ranking.close()
        if self._scorer.shadow is not None:
            self._scorer.shadow.close()
        for engine in self._retired:
            engine.close()

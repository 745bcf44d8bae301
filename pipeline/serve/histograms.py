"""The served side of drift: each batch's fraud-model inputs and scores counted into the
drift bins of the version that scored them (`engines.drift.Profile.histogram`, one compiled
pass), published as an InputHistogram record per version every
`monitor.histogram_interval_s`, beside the batch outputs (inside the transaction under
exactly-once). The monitor sums them over its window into PSI.

A version trained without a profile (before the monitor existed) is not counted. An idle
input publishes what is counted once the interval is over, and a stop publishes the rest.
"""

from __future__ import annotations

import time

import numpy as np

import schemas
from engines.base import Engine
from engines.drift import Profile
from pipeline.serve.records import FeatureBatch
from schemas.codec import Encoder


class InputHistograms:
    """Per model version, the counts since the last publication."""

    def __init__(self, interval_s: float, schema_id: int | None = None) -> None:
        """Publish every `interval_s`; records framed with `schema_id` (default: static)."""
        self._interval_s = interval_s
        self._encoder = Encoder(schemas.INPUT_HISTOGRAM, schema_id)
        self._profiles: dict[tuple[str, str], Profile | None] = {}
        self._counts: dict[tuple[str, str], np.ndarray] = {}
        self._events: dict[tuple[str, str], int] = {}
        self._started_ms = time.time() * 1000
        self._due = time.monotonic() + interval_s

    def add(self, engine: Engine, features: FeatureBatch, scores: np.ndarray) -> None:
        """Count one batch scored by `engine`."""
        key = (engine.name, engine.version)
        if key not in self._profiles:
            self._profiles[key] = Profile.from_manifest(engine.manifest)
        profile = self._profiles[key]
        if profile is None or not len(scores):
            return
        counts = profile.histogram(features.numeric, features.categorical, scores)
        if key in self._counts:
            self._counts[key] += counts
            self._events[key] += len(scores)
        else:
            self._counts[key] = counts
            self._events[key] = len(scores)

    @property
    def counted(self) -> bool:
        """Whether anything was counted since the last `take`."""
        return bool(self._counts)

    def due(self) -> bool:
        """Whether an interval has passed since the last `take`."""
        return time.monotonic() >= self._due

    def take(self) -> list[tuple[bytes, bytes]]:
        """The records (key, value) of the interval, one per version; counting restarts."""
        now_ms = time.time() * 1000
        records = [
            (
                version.encode(),
                self._encoder.encode(
                    {
                        "model_name": name,
                        "model_version": version,
                        "start_time": int(self._started_ms),
                        "end_time": int(now_ms),
                        "events": self._events[name, version],
                        "counts": counts.tolist(),
                    }
                ),
            )
            for (name, version), counts in self._counts.items()
        ]
        self._counts.clear()
        self._events.clear()
        self._started_ms = now_ms
        self._due = time.monotonic() + self._interval_s
        return records

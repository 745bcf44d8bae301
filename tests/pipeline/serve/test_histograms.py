"""The pipeline's input histograms: counted per serving version, published per interval."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import schemas
from engines.drift import Profile
from pipeline.serve.histograms import InputHistograms
from pipeline.serve.records import FeatureBatch
from schemas.codec import Decoder


@dataclass
class FakeEngine:
    name: str
    version: str
    manifest: dict[str, Any] = field(default_factory=dict)


def batch(rng, n):
    numeric = rng.random((n, 2)).astype(np.float32)
    categorical = rng.integers(0, 3, (n, 1))
    empty = np.zeros((n, 0), dtype=np.int64)
    return FeatureBatch(numeric, categorical, empty, empty), rng.random(n)


def test_counts_per_version_are_published_once_per_interval(monkeypatch):
    rng = np.random.default_rng(1)
    features, scores = batch(rng, 500)
    profile = Profile.fit(("a", "b", "c"), features.numeric, features.categorical, [3], scores)
    profile.histogram(features.numeric, features.categorical, scores)  # compiled before timing
    manifest = {"drift": profile.to_manifest()}
    old, new = FakeEngine("fraud", "1", manifest), FakeEngine("fraud", "2", manifest)
    histograms = InputHistograms(interval_s=60)
    first, first_scores = batch(rng, 40)
    second, second_scores = batch(rng, 25)
    histograms.add(old, first, first_scores)
    histograms.add(new, second, second_scores)
    histograms.add(FakeEngine("fraud", "0"), first, first_scores)  # no profile: not counted
    assert not histograms.due()
    later = time.monotonic() + 60  # the interval passes on this clock, not the machine's
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert histograms.due()
    records = dict(histograms.take())
    assert not histograms.due() and histograms.take() == []
    decoder = Decoder(schemas.INPUT_HISTOGRAM)
    one, two = decoder.decode(records[b"1"]), decoder.decode(records[b"2"])
    assert (one["events"], two["events"]) == (40, 25)
    expected = profile.histogram(first.numeric, first.categorical, first_scores)
    assert one["counts"] == expected.tolist()
    assert one["end_time"] >= one["start_time"] and one["model_name"] == "fraud"

"""`streamscore retrain` on the real broker: recent labelled events read back from the
topics train a challenger, which does not serve until promoted.
"""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from engines.registry import CHALLENGER, promote, resolve, versions
from pipeline.tools.loadgen import produce_clickstream
from pipeline.training.generator import GeneratorConfig
from pipeline.training.retrain import labelled_events
from pipeline.training.train import retrain_fraud
from tests.conftest import TINY_TRAINING

pytestmark = pytest.mark.integration


def test_a_challenger_trains_on_the_window_and_serves_only_once_promoted(
    kafka_settings, model_dir, tmp_path
):
    settings = kafka_settings
    config = GeneratorConfig(events=4_000, users=200, seed=9).anchored_before(time.time())
    produce_clickstream(settings, config)
    labelled = labelled_events(settings, window_s=3600)
    assert len(labelled.events) == 4_000 and labelled.unlabelled == 0
    assert 0 < labelled.labels.sum() < 4_000
    times = [event.event_time for event in labelled.events]
    assert times == sorted(times)
    # A window that starts after everything was produced holds nothing.
    assert labelled_events(settings, window_s=-60).events == []

    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    champion = resolve(models, "fraud").version
    path, report = retrain_fraud(
        models, labelled.events, labelled.labels, TINY_TRAINING, lambda *_: None,
        labelled.describe(),
    )  # fmt: skip
    challenger = path.name
    assert versions(models, "fraud", role=CHALLENGER) == [challenger]
    assert resolve(models, "fraud").version == champion  # not serving
    manifest = resolve(models, "fraud", challenger).manifest
    assert manifest["trained_on"]["events"] == 4_000 and "drift" in manifest
    assert 0 <= report["pr_auc"] <= 1
    promote(models, "fraud", challenger, {"reason": "test"})
    assert resolve(models, "fraud").version == challenger

    # Fine-tuned from the champion: its input normalisation is the champion's, not the
    # window's, and its manifest says where it started.
    start = resolve(models, "fraud")
    path, _ = retrain_fraud(
        models, labelled.events, labelled.labels, TINY_TRAINING, lambda *_: None,
        labelled.describe(), start,
    )  # fmt: skip
    tuned = resolve(models, "fraud", path.name)
    assert tuned.manifest["trained_on"]["fine_tuned_from"] == start.version
    before, after = (torch.load(a.weights_path, weights_only=True) for a in (start, tuned))
    assert torch.equal(before["mean"], after["mean"]) and torch.equal(before["std"], after["std"])
    assert not torch.equal(before["temperature"], after["temperature"])  # recalibrated

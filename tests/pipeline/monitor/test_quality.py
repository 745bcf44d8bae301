"""Online quality from counts: each figure against its definition on the raw outcomes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines import metrics
from pipeline.monitor.quality import (
    DELAY_EDGES_S,
    SCORE_BINS,
    Tally,
    Window,
    at_thresholds,
    binned_average_precision,
    figures,
    tally,
)
from pipeline.settings import DecisionSettings

DECISION = DecisionSettings(review_threshold=0.5, block_threshold=0.9)


def window_of(labels, scores, delays_s=None, window_s=60.0):
    window = Window(window_s, DECISION)
    delays_ms = np.zeros(len(labels)) if delays_s is None else np.asarray(delays_s) * 1000
    scored = np.full(len(labels), 10_000, dtype=np.int64)
    window.served("v1", scored)
    window.joined(
        "v1",
        np.asarray(scores, dtype=np.float64),
        np.asarray(labels, dtype=bool),
        scored,
        (scored + delays_ms).astype(np.int64),
    )
    return window


def test_figures_match_their_definitions():
    labels = np.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    scores = np.array([0.95, 0.6, 0.7, 0.1, 0.3, 0.92, 0.2, 0.05])
    report = window_of(labels, scores, delays_s=np.arange(8.0) * 10).report(now_ms=20_000)
    got = report["v1"]
    assert got["pr_auc"] == pytest.approx(metrics.pr_auc(labels, scores))
    assert got["brier"] == pytest.approx(np.mean((scores - labels) ** 2))
    assert got["precision_at_review"] == pytest.approx(2 / 4)  # 0.95, 0.6 of 4 flagged
    assert got["recall_at_review"] == pytest.approx(2 / 3)
    assert got["precision_at_block"] == pytest.approx(1 / 2)  # 0.95 of 0.95 and 0.92
    assert got["recall_at_block"] == pytest.approx(1 / 3)
    assert got["positive_rate"] == pytest.approx(3 / 8)
    assert got["served"] == 8 and got["labelled"] == 8 and got["label_coverage"] == 1
    # delays 0..70 s: the median lies in the bin holding 30 s, whose upper edge is ≤ 5% above
    assert 30 <= got["label_delay_p50_s"] <= 30 * 1.05
    assert 60 <= got["label_delay_p90_s"] <= 70 * 1.05


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 1)), min_size=1, max_size=300))
def test_calibration_brier_and_threshold_counts_are_exact(rows):
    labels = np.array([y for y, _ in rows], dtype=bool)
    scores = np.array([p for _, p in rows])
    got = window_of(labels, scores).report(now_ms=20_000)["v1"]
    bins = np.minimum((scores * 10).astype(int), 9)
    expected = sum(
        abs(scores[bins == b].mean() - labels[bins == b].mean()) * (bins == b).sum()
        for b in range(10)
        if (bins == b).any()
    ) / len(rows)
    assert got["ece"] == pytest.approx(expected)
    assert got["brier"] == pytest.approx(np.mean((scores - labels) ** 2))
    flagged = scores >= 0.9
    if labels.any():
        assert got["recall_at_block"] == pytest.approx((flagged & labels).sum() / labels.sum())
    else:
        assert math.isnan(got["recall_at_block"]) and math.isnan(got["pr_auc"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, SCORE_BINS - 1)), min_size=2))
def test_binned_average_precision_is_average_precision_with_ties_grouped(rows):
    """On scores that fall one per bin value, the binned figure is the exact average
    precision where tied scores form one step (scikit-learn's definition).
    """
    labels = np.array([y for y, _ in rows], dtype=bool)
    bins = np.array([b for _, b in rows])
    positives = np.bincount(bins[labels], minlength=SCORE_BINS)
    negatives = np.bincount(bins[~labels], minlength=SCORE_BINS)
    got = binned_average_precision(positives, negatives)
    if labels.all() or not labels.any():
        assert math.isnan(got)
        return
    expected, caught, flagged = 0.0, 0, 0
    for value in sorted(set(bins.tolist()), reverse=True):
        tied = bins == value
        caught += int((tied & labels).sum())
        flagged += int(tied.sum())
        expected += (tied & labels).sum() / labels.sum() * caught / flagged
    assert got == pytest.approx(expected)


def test_the_window_slides_and_versions_stay_apart():
    window = Window(window_s=60, decision=DECISION)  # one-second buckets
    one = np.array([True])
    window.served("1", np.array([1_000, 1_000]))
    window.joined("1", np.array([0.9]), one, np.array([1_000]), np.array([1_000]))
    window.joined("1", np.array([0.1]), ~one, np.array([1_000]), np.array([59_000]))
    window.joined("2", np.array([0.2]), one, np.array([1_000]), np.array([59_500]))
    report = window.report(now_ms=60_000)
    assert report["1"]["labelled"] == 2 and report["2"]["labelled"] == 1
    assert report["1"]["label_coverage"] == 1  # both served scores labelled
    assert math.isnan(report["2"]["label_coverage"])  # its score was never seen served
    report = window.report(now_ms=62_000)  # what happened at 1 s left the window
    assert report["1"]["labelled"] == 1 and report["1"]["positive_rate"] == 0
    assert report["1"]["served"] == 0
    assert window.report(now_ms=200_000) == {}


def test_a_late_label_counts_in_coverage_only_while_its_score_is_in_the_window():
    window = Window(window_s=60, decision=DECISION)
    window.served("1", np.array([10_000, 10_000]))
    window.joined("1", np.array([0.5]), np.array([True]), np.array([10_000]), np.array([30_000]))
    assert window.report(now_ms=40_000)["1"]["label_coverage"] == 0.5
    window.joined("1", np.array([0.5]), np.array([True]), np.array([1]), np.array([40_000]))
    assert window.report(now_ms=40_000)["1"]["label_coverage"] == 0.5  # score at 1 ms: gone


def test_undefined_figures_are_nan_not_zero():
    got = figures(Tally())
    assert got["labelled"] == 0
    for name in ("pr_auc", "brier", "ece", "positive_rate", "recall_at_block", "label_coverage"):
        assert math.isnan(got[name]), name
    assert DELAY_EDGES_S[0] == 0 and np.all(np.diff(DELAY_EDGES_S) > 0)


def test_a_stored_tally_read_at_other_thresholds_counts_as_if_taken_at_them():
    """The baseline: a validation tally stored at training's thresholds, read at today's."""
    rng = np.random.default_rng(2)
    scores = rng.integers(0, SCORE_BINS, 500) / SCORE_BINS  # on the 1/1000 grid: exact
    labels = rng.random(500) < 0.3
    today = DecisionSettings(review_threshold=0.3, block_threshold=0.75)
    stored = tally(scores, labels, DECISION)
    moved = at_thresholds(stored, today)
    direct = tally(scores, labels, today)
    assert moved.flagged.tolist() == direct.flagged.tolist()
    assert moved.flagged_hits.tolist() == direct.flagged_hits.tolist()
    assert figures(moved) == pytest.approx(figures(direct), nan_ok=True)
    assert stored.flagged.tolist() == tally(scores, labels, DECISION).flagged.tolist()  # untouched
    assert figures(Tally.from_json(stored.to_json())) == pytest.approx(figures(stored), nan_ok=True)

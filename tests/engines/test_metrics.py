import numpy as np
import pytest

from engines import metrics


def test_perfect_and_inverted_rankings():
    labels = np.array([0, 0, 1, 1])
    assert metrics.pr_auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert metrics.roc_auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert metrics.roc_auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0


def test_average_precision_by_hand():
    # ranked: 1, 0, 1 -> precision at hits: 1/1, 2/3 -> AP = (1 + 2/3) / 2
    assert metrics.pr_auc(np.array([1, 0, 1]), np.array([0.9, 0.8, 0.7])) == pytest.approx(5 / 6)


def test_roc_auc_counts_ties_as_half():
    assert metrics.roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5


def test_recall_at_fpr_and_brier():
    labels = np.array([0] * 100 + [1] * 10)
    scores = np.concatenate([np.linspace(0, 0.5, 100), np.linspace(0.4, 0.9, 10)])
    # 1% of 100 negatives may pass: the threshold is the 2nd-highest negative (0.495),
    # which 8 of the 10 positives exceed.
    assert metrics.recall_at_fpr(labels, scores, 0.01) == pytest.approx(0.8)
    assert metrics.brier(np.array([1, 0]), np.array([1.0, 0.5])) == pytest.approx(0.125)


def test_ranking_metrics_from_ranks():
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.9, 0.2]])
    ranks = metrics.rank_of_first(scores)
    assert list(ranks) == [0, 2]
    report = metrics.ranking_metrics(ranks, k=2)
    assert report["hitrate_at_2"] == 0.5
    assert report["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert report["ndcg_at_2"] == pytest.approx(0.5)


def test_precision_recall_curve_and_calibration_bins():
    precision, recall = metrics.precision_recall_curve(
        np.array([1, 0, 1]), np.array([0.9, 0.8, 0.7])
    )
    assert list(precision) == pytest.approx([1.0, 0.5, 2 / 3])
    assert list(recall) == pytest.approx([0.5, 0.5, 1.0])
    predicted, observed, counts = metrics.calibration_bins(
        np.array([0, 1, 1, 0]), np.array([0.05, 0.15, 0.95, 1.0]), bins=10
    )
    assert counts[0] == 1 and counts[1] == 1 and counts[9] == 2
    assert observed[9] == 0.5 and predicted[9] == pytest.approx(0.975)

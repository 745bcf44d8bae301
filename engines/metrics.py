"""Quality metrics for the fraud and ranking models.

Written with numpy instead of pulling scikit-learn for four formulas; tests check them
against hand-computed cases.
"""

from __future__ import annotations

import numpy as np


def pr_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: the area under the precision-recall curve (step interpolation)."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order].astype(np.float64)
    positives = hits.sum()
    if positives == 0:
        return 0.0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / positives)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    positives = labels.astype(bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    if n_pos == 0 or n_neg == 0:
        return 0.5
    ranks = _average_ranks(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def recall_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = 0.01) -> float:
    """Share of positives caught at the threshold that flags `fpr` of the negatives."""
    positives = labels.astype(bool)
    negatives = np.sort(scores[~positives])[::-1]
    if len(negatives) == 0 or positives.sum() == 0:
        return 0.0
    allowed = int(np.floor(fpr * len(negatives)))
    threshold = negatives[allowed] if allowed < len(negatives) else -np.inf
    return float((scores[positives] > threshold).mean())


def brier(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean squared error of the probabilities."""
    return float(np.mean((scores - labels.astype(np.float64)) ** 2))


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every cut of the descending score order."""
    hits = labels[np.argsort(-scores, kind="stable")].astype(np.float64)
    caught = np.cumsum(hits)
    precision = caught / np.arange(1, len(hits) + 1)
    recall = caught / max(hits.sum(), 1.0)
    return precision, recall


def calibration_bins(
    labels: np.ndarray, scores: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean predicted probability, observed positive rate and count per equal-width bin."""
    index = np.minimum((scores * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    predicted = np.bincount(index, weights=scores, minlength=bins) / safe
    observed = np.bincount(index, weights=labels.astype(np.float64), minlength=bins) / safe
    return predicted, observed, counts


def ranking_metrics(positive_rank: np.ndarray, k: int = 10) -> dict[str, float]:
    """NDCG@k, HitRate@k and MRR from the 0-based rank of the one relevant item per query."""
    ranks = positive_rank.astype(np.float64)
    hit = ranks < k
    return {
        f"ndcg_at_{k}": float(np.mean(np.where(hit, 1.0 / np.log2(ranks + 2), 0.0))),
        f"hitrate_at_{k}": float(hit.mean()),
        "mrr": float(np.mean(1.0 / (ranks + 1))),
    }


def rank_of_first(scores: np.ndarray) -> np.ndarray:
    """0-based rank of column 0 in each row when sorted by descending score (ties pessimistic)."""
    ranks: np.ndarray = (scores[:, 1:] >= scores[:, :1]).sum(axis=1)
    return ranks


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks

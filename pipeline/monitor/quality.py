"""Online quality per model version over a sliding window, kept as counts.

A window of joined outcomes at the pipeline's rate (every event is labelled, sooner or
later) would be millions of records; instead each model version keeps one `Tally` per
time bucket (a sixtieth of the window): score histograms of positives and negatives, the
calibration bins' sums, the outcomes at the review and block thresholds, a label-delay
histogram and the coverage counts. Adding a batch of joins is a few `np.add.at`; a report
sums the buckets in the window. Counts are exact for everything but PR-AUC (scores binned to
1/1000, ties within a bin treated as one step of the curve) and the label-delay
percentiles (the upper edge of a geometric bin, 5% wide).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.settings import DecisionSettings

SCORE_BINS = 1000
CALIBRATION_BINS = 10
# Label delay, in seconds: [0, 1), then geometric bins 5% wide up to 60 days, then beyond.
DELAY_EDGES_S = np.concatenate([[0.0], np.geomspace(1.0, 60 * 86400.0, 370)])
BUCKETS_PER_WINDOW = 60
THRESHOLDS = ("review", "block")


def _zeros(size: int, dtype: type = np.int64) -> np.ndarray:
    return np.zeros(size, dtype=dtype)


@dataclass(slots=True)
class Tally:
    """One model version's outcomes in one time bucket, as counts."""

    positives: np.ndarray = field(default_factory=lambda: _zeros(SCORE_BINS))
    negatives: np.ndarray = field(default_factory=lambda: _zeros(SCORE_BINS))
    calibration_count: np.ndarray = field(default_factory=lambda: _zeros(CALIBRATION_BINS))
    calibration_positives: np.ndarray = field(default_factory=lambda: _zeros(CALIBRATION_BINS))
    calibration_scores: np.ndarray = field(
        default_factory=lambda: _zeros(CALIBRATION_BINS, np.float64)
    )
    squared_error: float = 0.0
    flagged: np.ndarray = field(default_factory=lambda: _zeros(len(THRESHOLDS)))
    flagged_hits: np.ndarray = field(default_factory=lambda: _zeros(len(THRESHOLDS)))
    delays: np.ndarray = field(default_factory=lambda: _zeros(len(DELAY_EDGES_S)))
    served: int = 0  # scores served in this bucket (by served time)
    served_labelled: int = 0  # of those, joined to a label so far

    def add(self, other: Tally) -> None:
        """Sum `other` into this one."""
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict[str, Any]:
        """As plain lists and numbers (a model manifest holds its validation tally)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in values.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        """The tally `to_json` wrote."""
        tally = cls()
        for name, value in data.items():
            current = getattr(tally, name)
            if isinstance(current, np.ndarray):
                value = np.array(value, dtype=current.dtype)
            setattr(tally, name, value)
        return tally


def at_thresholds(tally: Tally, decision: DecisionSettings) -> Tally:
    """`tally` with its threshold counts taken again from its score histograms at
    `decision`'s thresholds (exact for thresholds on a 1/SCORE_BINS step): a validation
    tally stored at training time, read under today's thresholds.
    """
    out = copy.deepcopy(tally)
    for i, threshold in enumerate((decision.review_threshold, decision.block_threshold)):
        first = min(int(np.floor(threshold * SCORE_BINS + 1e-9)), SCORE_BINS - 1)
        out.flagged[i] = tally.positives[first:].sum() + tally.negatives[first:].sum()
        out.flagged_hits[i] = tally.positives[first:].sum()
    return out


def tally(
    scores: np.ndarray,
    labels: np.ndarray,
    decision: DecisionSettings,
    delays_s: np.ndarray | None = None,
) -> Tally:
    """One tally of outcomes (training's validation set; the window's joins per bucket)."""
    out = Tally()
    thresholds = np.array([decision.review_threshold, decision.block_threshold])
    delays = np.zeros(len(scores)) if delays_s is None else delays_s
    _tally_into(out, scores.astype(np.float64), labels.astype(bool), delays, thresholds)
    return out


class Window:
    """Each model version's tallies over the last `window_s`, in buckets by time."""

    def __init__(self, window_s: float, decision: DecisionSettings) -> None:
        """Figures over `window_s`; precision and recall at `decision`'s thresholds."""
        self.window_s = window_s
        self._bucket_ms = max(1.0, window_s * 1000.0 / BUCKETS_PER_WINDOW)
        self._thresholds = np.array([decision.review_threshold, decision.block_threshold])
        self._tallies: dict[str, dict[int, Tally]] = {}
        self._inputs: dict[str, dict[int, np.ndarray]] = {}  # input histograms (drift)

    def served(self, version: str, scored_ms: np.ndarray) -> None:
        """Scores of `version` served at `scored_ms` (coverage's denominator)."""
        buckets = self._buckets(version)
        for bucket, count in zip(
            *np.unique(self._bucket(scored_ms), return_counts=True), strict=True
        ):
            buckets.setdefault(int(bucket), Tally()).served += int(count)

    def joined(
        self,
        version: str,
        scores: np.ndarray,
        labels: np.ndarray,
        scored_ms: np.ndarray,
        labelled_ms: np.ndarray,
    ) -> None:
        """Outcomes of `version`: each score with its label (bool), by label time."""
        buckets = self._buckets(version)
        scored_bucket = self._bucket(scored_ms)
        for bucket, count in zip(*np.unique(scored_bucket, return_counts=True), strict=True):
            tally = buckets.get(int(bucket))  # a score older than the window: not counted
            if tally is not None:
                tally.served_labelled += int(count)
        labelled_bucket = self._bucket(labelled_ms)
        delays_s = np.maximum(labelled_ms - scored_ms, 0) / 1000.0
        for bucket in np.unique(labelled_bucket):
            rows = labelled_bucket == bucket
            _tally_into(
                buckets.setdefault(int(bucket), Tally()),
                scores[rows],
                labels[rows],
                delays_s[rows],
                self._thresholds,
            )

    def inputs(self, version: str, counts: np.ndarray, at_ms: int) -> None:
        """An input histogram of `version` (the pipeline's, ending at `at_ms`)."""
        buckets = self._inputs.setdefault(version, {})
        bucket = int(self._bucket(np.array([at_ms]))[0])
        buckets[bucket] = buckets[bucket] + counts if bucket in buckets else counts

    def input_counts(self, version: str) -> np.ndarray | None:
        """The sum of `version`'s input histograms in the window at the last `report`."""
        buckets = self._inputs.get(version)
        if not buckets:
            return None
        total: np.ndarray = np.sum(list(buckets.values()), axis=0)
        return total

    def report(self, now_ms: float) -> dict[str, dict[str, float]]:
        """Per model version with anything in the window ending at `now_ms`: its figures
        (NaN where undefined). Buckets that left the window are dropped.
        """
        oldest = int(self._bucket(np.array([now_ms - self.window_s * 1000.0]))[0]) + 1
        for version, inputs in list(self._inputs.items()):
            for bucket in [b for b in inputs if b < oldest]:
                del inputs[bucket]
            if not inputs:
                del self._inputs[version]
        out = {}
        for version, buckets in list(self._tallies.items()):
            for bucket in [b for b in buckets if b < oldest]:
                del buckets[bucket]
            if not buckets:
                del self._tallies[version]
                continue
            total = Tally()
            for tally in buckets.values():
                total.add(tally)
            out[version] = figures(total)
        return out

    def _buckets(self, version: str) -> dict[int, Tally]:
        return self._tallies.setdefault(version, {})

    def _bucket(self, ms: np.ndarray) -> np.ndarray:
        buckets: np.ndarray = np.floor_divide(ms, self._bucket_ms).astype(np.int64)
        return buckets


def _tally_into(
    tally: Tally,
    scores: np.ndarray,
    labels: np.ndarray,
    delays_s: np.ndarray,
    thresholds: np.ndarray,
) -> None:
    scores = np.clip(scores, 0.0, 1.0)
    fine = np.minimum((scores * SCORE_BINS).astype(np.int64), SCORE_BINS - 1)
    np.add.at(tally.positives, fine[labels], 1)
    np.add.at(tally.negatives, fine[~labels], 1)
    coarse = np.minimum((scores * CALIBRATION_BINS).astype(np.int64), CALIBRATION_BINS - 1)
    np.add.at(tally.calibration_count, coarse, 1)
    np.add.at(tally.calibration_positives, coarse[labels], 1)
    np.add.at(tally.calibration_scores, coarse, scores)
    tally.squared_error += float(((scores - labels) ** 2).sum())
    flagged = scores[:, None] >= thresholds[None, :]
    tally.flagged += flagged.sum(axis=0)
    tally.flagged_hits += flagged[labels].sum(axis=0)
    delay_bin = np.searchsorted(DELAY_EDGES_S, delays_s, side="right") - 1
    np.add.at(tally.delays, delay_bin, 1)


def figures(tally: Tally) -> dict[str, float]:
    """The quality figures of one version's summed tally (NaN where undefined)."""
    positives = int(tally.positives.sum())
    labelled = positives + int(tally.negatives.sum())
    nan = math.nan
    out = {
        "served": float(tally.served),
        "labelled": float(labelled),
        "label_coverage": tally.served_labelled / tally.served if tally.served else nan,
        "positive_rate": positives / labelled if labelled else nan,
        "pr_auc": binned_average_precision(tally.positives, tally.negatives),
        "brier": tally.squared_error / labelled if labelled else nan,
        "ece": expected_calibration_error(
            tally.calibration_count, tally.calibration_positives, tally.calibration_scores
        ),
        "label_delay_p50_s": _delay_quantile(tally.delays, 0.5),
        "label_delay_p90_s": _delay_quantile(tally.delays, 0.9),
    }
    for i, name in enumerate(THRESHOLDS):
        flagged, hits = int(tally.flagged[i]), int(tally.flagged_hits[i])
        out[f"precision_at_{name}"] = hits / flagged if flagged else nan
        out[f"recall_at_{name}"] = hits / positives if positives else nan
    return out


def binned_average_precision(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Average precision from score histograms, highest bin first: each bin is one step of
    the precision-recall curve (its scores count as tied). NaN without both classes.
    """
    total_positive = positives.sum()
    if total_positive == 0 or negatives.sum() == 0:
        return math.nan
    hits = positives[::-1].astype(np.float64)
    flagged = np.cumsum(hits + negatives[::-1])
    caught = np.cumsum(hits)
    precision = np.divide(caught, flagged, out=np.zeros_like(caught), where=flagged > 0)
    return float((precision * hits).sum() / total_positive)


def expected_calibration_error(
    counts: np.ndarray, positives: np.ndarray, score_sums: np.ndarray
) -> float:
    """Count-weighted mean gap between the mean score and the positive rate of each bin."""
    total = counts.sum()
    if total == 0:
        return math.nan
    safe = np.maximum(counts, 1)
    gaps = np.abs(score_sums / safe - positives / safe)
    return float((counts * gaps).sum() / total)


def _delay_quantile(delays: np.ndarray, q: float) -> float:
    total = delays.sum()
    if total == 0:
        return math.nan
    index = int(np.searchsorted(np.cumsum(delays), q * total, side="left"))
    upper = DELAY_EDGES_S[index + 1] if index + 1 < len(DELAY_EDGES_S) else math.inf
    return float(upper)

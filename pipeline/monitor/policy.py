"""The promotion policy: when a challenger has beaten the champion on the same labels.

Both versions are compared on the labels each was joined to over the monitor's window; the
challenger wins when it beats the champion by `monitor.promote_margin_pr_auc` in PR-AUC and
by `monitor.promote_margin_recall` in recall at block, with at least
`monitor.promote_min_labels` labels. What is done with a win (promote, or recommend) is the
monitor's (`service.Monitor.decide`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection
from typing import Any

from engines.registry import CHALLENGER, CHAMPION
from pipeline.settings import MonitorSettings

FIGURES = ("pr_auc", "recall_at_block", "precision_at_block", "ece")  # in each verdict


def verdict(
    contest: dict[str, dict[str, float]],
    role: Callable[[str], str],
    promoted: Collection[str],
    monitor: MonitorSettings,
) -> dict[str, Any] | None:
    """The verdict on the newest challenger against the newest champion in `contest`
    (version -> figures over the window; `role` says each version's role): their figures,
    the margins and whether it `won`. None when there is no pair to judge, the challenger
    was promoted already (its shadow scores still in flight name it a challenger), or the
    labels are too few.
    """
    by_role: dict[str, list[str]] = defaultdict(list)
    for version in contest:
        by_role[role(version)].append(version)
    if not by_role[CHAMPION] or not by_role[CHALLENGER]:
        return None
    champion = max(by_role[CHAMPION], key=version_order)
    challenger = max(by_role[CHALLENGER], key=version_order)
    if challenger in promoted:
        return None
    old, new = contest[champion], contest[challenger]
    labelled = int(min(old["labelled"], new["labelled"]))
    if labelled < monitor.promote_min_labels:
        return None
    # NaN (no positives yet) compares False: no promotion on undefined figures.
    won = bool(
        new["pr_auc"] >= old["pr_auc"] + monitor.promote_margin_pr_auc
        and new["recall_at_block"] >= old["recall_at_block"] + monitor.promote_margin_recall
    )
    return {
        "champion": champion,
        "challenger": challenger,
        "labelled": labelled,
        "champion_figures": rounded({k: old[k] for k in FIGURES}),
        "challenger_figures": rounded({k: new[k] for k in FIGURES}),
        "margins": {
            "pr_auc": monitor.promote_margin_pr_auc,
            "recall_at_block": monitor.promote_margin_recall,
        },
        "won": won,
    }


def version_order(version: str) -> tuple[int, str]:
    """Newest last: numeric versions by number, others before them by name."""
    return (int(version) if version.isdigit() else -1, version)


def rounded(figures: dict[str, float]) -> dict[str, float]:
    """Figures to 4 places, undefined ones (NaN) left out."""
    return {name: round(value, 4) for name, value in figures.items() if not math.isnan(value)}

"""The promotion policy on hand-made contest figures (no broker: the verdict alone)."""

import math

import pytest

from engines.registry import CHALLENGER, CHAMPION
from pipeline.monitor.service import Monitor
from pipeline.settings import load_settings


def figures(pr_auc, recall, labelled=2000):
    return {
        "pr_auc": pr_auc,
        "recall_at_block": recall,
        "precision_at_block": 0.9,
        "ece": 0.01,
        "labelled": labelled,
    }


@pytest.fixture
def monitor(tmp_path):
    settings = load_settings(
        engine={"model_dir": str(tmp_path)},  # empty: a promotion here would fail loudly
        monitor={"promote_min_labels": 1000},
        privacy={"pseudonym_key": "k" * 32},
    )
    monitor = Monitor(settings)
    monitor._roles.update({"4": CHAMPION, "5": CHALLENGER})
    return monitor


@pytest.mark.parametrize(
    ("challenger", "why"),
    [
        (figures(0.81, 0.95), "PR-AUC within the margin"),
        (figures(0.95, 0.71), "recall within the margin"),
        (figures(math.nan, 0.95), "PR-AUC undefined"),
        (figures(0.95, 0.95, labelled=999), "too few labels"),
    ],
)
def test_no_verdict_or_a_refusal_unless_both_margins_hold_on_enough_labels(
    monitor, challenger, why
):
    monitor.decide({"4": figures(0.8, 0.7), "5": challenger}, act=True)
    if challenger["labelled"] < 1000:
        assert list(monitor.verdicts) == [], why
    else:
        (verdict,) = monitor.verdicts
        assert not verdict["won"] and not verdict["promoted"], why
        assert verdict["challenger_figures"]["recall_at_block"] == challenger["recall_at_block"]


def test_with_promotion_off_a_win_is_recommended_not_promoted(monitor):
    monitor.decide({"4": figures(0.8, 0.7), "5": figures(0.9, 0.9)}, act=False)
    (verdict,) = monitor.verdicts
    assert (verdict["champion"], verdict["challenger"]) == ("4", "5")
    assert verdict["won"] and not verdict["promoted"]  # logged model_promotion_recommended
    assert verdict["challenger_figures"]["recall_at_block"] == 0.9

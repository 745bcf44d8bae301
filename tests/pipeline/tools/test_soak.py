"""The soak's verdict on synthetic runs: each check can fail, and says which."""

from pipeline.tools.loadgen import ProduceReport
from pipeline.tools.soak import Sample, SoakPlan, judge, rss_growth_mb

PLAN = SoakPlan(seconds=600, rate=1000, max_lag_s=10, max_rss_growth_mb=50)
SENT = ProduceReport(events=600_000, with_candidates=1000, malformed=0, seconds=600.0)
STATS = {"consumed": 600_000, "scored": 600_000, "dead_lettered": 0, "late": 1200}


def samples(rss=lambda t: 800.0, lag=lambda t: 500):
    return [Sample(float(t), lag(t), rss(t)) for t in range(0, 601, 5)]


def failed(verdict):
    return [name for name, held in verdict.checks.items() if not held]


def test_a_steady_run_passes():
    verdict = judge(PLAN, samples(), SENT, STATS, [])
    assert verdict.passed, verdict.checks
    assert verdict.figures["max_lag_s"] == 0.5


def test_memory_that_keeps_growing_fails_but_warm_up_does_not():
    warm_up = samples(rss=lambda t: 600.0 + min(t, 150))  # fills during the first third only
    assert judge(PLAN, warm_up, SENT, STATS, []).passed
    leaking = samples(rss=lambda t: 800.0 + t * 0.2)  # 80 MB over the last two thirds
    assert failed(judge(PLAN, leaking, SENT, STATS, [])) == ["RSS grew under 50 MB"]
    assert 75 < rss_growth_mb(leaking) < 85


def test_lag_past_its_bound_fails():
    behind = samples(lag=lambda t: 11_000 if t == 300 else 100)
    assert failed(judge(PLAN, behind, SENT, STATS, [])) == ["lag under 10 s of input"]


def test_an_unexpected_dead_letter_or_a_lost_input_fails():
    dead = STATS | {"scored": 599_999, "dead_lettered": 1}
    assert failed(judge(PLAN, samples(), SENT, dead, ["validate.event_time_future"])) == [
        "dead letters are the malformed sent"
    ]
    lost = STATS | {"consumed": 599_990, "scored": 599_990}
    assert failed(judge(PLAN, samples(), SENT, lost, [])) == ["every input accounted for"]


def test_malformed_input_sent_on_purpose_is_expected_in_the_dead_letters():
    sent = ProduceReport(events=600_000, with_candidates=1000, malformed=6, seconds=600.0)
    stats = STATS | {"consumed": 600_006, "dead_lettered": 6}
    assert judge(PLAN, samples(), sent, stats, ["decode.bad_magic_byte"] * 6).passed

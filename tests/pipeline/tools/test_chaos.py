"""The chaos run's schedule and verdict, without a cluster (the run itself: `make chaos`,
and the fault paths it found: tests/integration/test_cluster.py).
"""

from pipeline.tools.chaos import BROKER_FAULTS, JITTER_S, ChaosPlan, judge, schedule
from pipeline.tools.loadgen import ProduceReport


def test_a_seed_replays_the_same_schedule_and_another_draws_a_different_one():
    assert schedule(ChaosPlan(seed=4)) == schedule(ChaosPlan(seed=4))
    assert any(schedule(ChaosPlan(seed=s)) != schedule(ChaosPlan(seed=4)) for s in range(5, 9))


def test_every_fault_is_applied_near_its_time_and_each_repair_after_its_fault():
    for seed in range(20):
        faults = schedule(ChaosPlan(seed=seed, instances=3))
        assert sorted(f.kind for f in faults) == sorted(kind for _, kind, _ in BROKER_FAULTS)
        at = {(f.kind, f.target): f.at_s for f in faults}
        for planned, kind, _ in BROKER_FAULTS:
            assert any(abs(f.at_s - planned) <= JITTER_S for f in faults if f.kind == kind)
        instance = next(f.target for f in faults if f.kind == "kill_instance")
        assert int(instance) in range(3)
        assert at[("restart_instance", instance)] > at[("kill_instance", instance)]
        assert at[("restart_node", "a")] > at[("kill_leader_node", "a")]
        assert at[("cont_node", "b")] > at[("stop_node", "b")]
        assert at[("restart_node", "c")] > at[("kill_node", "c")]
        assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)


def test_the_verdict_counts_by_event_id():
    sent = ProduceReport(events=4, with_candidates=0, malformed=0, seconds=1.0)
    inputs = ["e1", "e2", "e3", "e4"]
    clean = judge(ChaosPlan(), sent, inputs, ["e4", "e3", "e2", "e1"], 0, {0: 0, 1: 0}, 5.0)
    assert clean.passed
    verdict = judge(ChaosPlan(), sent, inputs, ["e1", "e1", "e2", "x"], 1, {0: 0, 1: 1}, None)
    assert verdict.figures["unscored"] == 2
    assert verdict.figures["duplicated_scores"] == 1
    assert verdict.figures["scores_of_unknown_events"] == 1
    assert [name for name, held in verdict.checks.items() if held] == ["every event written"]
    at_least_once = ChaosPlan(guarantee="at_least_once")
    repeated = judge(at_least_once, sent, inputs, [*inputs, "e1"], 0, {0: 0}, 2.0)
    assert repeated.passed and repeated.figures["duplicated_scores"] == 1

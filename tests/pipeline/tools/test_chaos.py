"""The chaos run's schedule and verdict, without a cluster (the run itself: `make chaos`,
and the fault paths it found: tests/integration/test_cluster.py).
"""

from collections import Counter

from pipeline.tools.chaos import (
    BROKER_FAULTS,
    FIRST_FAULT_S,
    JITTER_S,
    NODE_FAULTS,
    QUIET_TAIL_S,
    REPAIRS,
    ChaosPlan,
    Observed,
    coordinator_partition,
    java_hash,
    judge,
    schedule,
)
from pipeline.tools.loadgen import ProduceReport

ISSUE48 = {"schedule": "issue48"}


def test_a_seed_replays_the_same_schedule_and_another_draws_a_different_one():
    for kind in ("random", "issue48"):
        plan = ChaosPlan(seed=4, schedule=kind)  # type: ignore[arg-type]
        assert schedule(plan) == schedule(ChaosPlan(seed=4, schedule=kind))  # type: ignore[arg-type]
        others = (ChaosPlan(seed=s, schedule=kind) for s in range(5, 9))  # type: ignore[arg-type]
        assert any(schedule(other) != schedule(plan) for other in others)


def test_the_issue48_schedule_applies_each_fault_near_its_time_and_each_repair_after_it():
    for seed in range(20):
        faults = schedule(ChaosPlan(seed=seed, instances=3, **ISSUE48))
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


def test_a_random_schedule_draws_every_kind_and_repairs_each_fault_before_the_end():
    for seed in range(10):  # ten-minute runs
        plan = ChaosPlan(events=600_000, rate=1000.0, seed=seed)
        faults = schedule(plan)
        kinds = Counter(f.kind for f in faults)
        assert all(kinds[kind] >= 3 for kind in NODE_FAULTS), kinds
        assert kinds["kill_instance"] >= 10 and kinds["scale_out"] == 1
        assert sum(n for kind, n in kinds.items() if kind in REPAIRS) >= 60
        end = plan.events / plan.rate - QUIET_TAIL_S
        assert all(FIRST_FAULT_S <= f.at_s <= end for f in faults)
        assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)
        for fault in (f for f in faults if f.kind in REPAIRS):  # repaired, later, once
            repairs = [
                r for r in faults if r.kind == REPAIRS[fault.kind] and r.target == fault.target
            ]
            if fault.kind != "kill_instance":
                assert len(repairs) == 1 and repairs[0].at_s > fault.at_s
            else:
                assert any(r.at_s > fault.at_s for r in repairs)
        # One node fault at a time: each repaired before the next starts.
        down = 0
        for f in faults:
            if f.kind in NODE_FAULTS:
                down += 1
            elif f.kind in ("restart_node", "cont_node"):
                down -= 1
            assert down <= 1
        txn = [f for f in faults if f.kind == "kill_txn_coordinator"]
        assert all(f.instance in range(plan.instances) for f in txn)


def test_a_coordinator_is_the_partition_kafka_hashes_its_key_to():
    # Java: "hello".hashCode() == 99162322; "polygenelubricants".hashCode() is
    # Integer.MIN_VALUE, which Kafka's Utils.abs maps to 0.
    assert java_hash("hello") == 99162322 and java_hash("") == 0
    assert java_hash("polygenelubricants") == -(2**31)
    assert coordinator_partition("polygenelubricants", 50) == 0
    assert coordinator_partition("hello", 50) == 99162322 % 50
    assert java_hash("é") == 233  # a UTF-16 code unit, not a UTF-8 byte


def seen(scored, exits=None, **more):
    sent = ProduceReport(events=4, with_candidates=0, malformed=0, seconds=1.0)
    fields = {"digest_mismatches": 0, "caught_up_s": 5.0, "exits": exits or {"0": 0, "1": 0}}
    return Observed(
        sent=sent, input_ids=["e1", "e2", "e3", "e4"], scored_ids=scored, **(fields | more)
    )


def test_the_verdict_counts_by_event_id():
    assert judge(ChaosPlan(), seen(["e4", "e3", "e2", "e1"])).passed
    verdict = judge(
        ChaosPlan(),
        seen(["e1", "e1", "e2", "x"], {"0": 0, "1": 1}, dead_letters=1, caught_up_s=None),
    )
    assert verdict.figures["unscored"] == 2
    assert verdict.figures["duplicated_scores"] == 1
    assert verdict.figures["scores_of_unknown_events"] == 1
    failed = {name for name, held in verdict.checks.items() if not held}
    assert "every event written" not in failed
    assert {"every event scored", "no dead letter", "every instance stopped cleanly"} <= failed
    assert "no duplicated score or recommendation" in failed
    at_least_once = ChaosPlan(guarantee="at_least_once")
    repeated = judge(at_least_once, seen(["e1", "e2", "e3", "e4", "e1"], digest_mismatches=3))
    assert repeated.passed and repeated.figures["duplicated_scores"] == 1


def test_state_and_recommendations_count_under_exactly_once():
    inputs = ["e1", "e2", "e3", "e4"]
    mismatched = judge(ChaosPlan(), seen(inputs, digest_mismatches=2))
    assert not mismatched.checks["features equal a fault-free replay's"]
    unrecommended = judge(ChaosPlan(), seen(inputs, candidate_ids=["e2"], recommended_ids=[]))
    assert not unrecommended.checks["every event with candidates recommended"]
    twice = judge(ChaosPlan(), seen(inputs, candidate_ids=["e2"], recommended_ids=["e2", "e2"]))
    assert twice.figures["duplicated_recommendations"] == 1 and not twice.passed
    crashed = judge(ChaosPlan(), seen(inputs, unplanned_exits=["instance 1: 3"]))
    assert not crashed.checks["no instance exited unless killed"]

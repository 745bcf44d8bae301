"""The monitor's join: both orders, its bounds, and its changelog round trip."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.monitor.join import LABELS, SCORES, Join, Pair, Waiting, changelog_key


def test_either_side_may_come_first():
    join = Join(window_s=60, max_pending=10)
    assert join.score("e1", "3", 0.8, 1_000, 9_000) is None
    assert join.label("e1", True, 5_000, 9_001) == Pair("3", 0.8, True, 1_000, 5_000)
    assert join.label("e2", False, 6_000, 9_002) is None
    assert join.score("e2", "4", 0.1, 2_000, 9_003) == Pair("4", 0.1, False, 2_000, 6_000)
    assert join.pending() == {SCORES: 0, LABELS: 0}


def test_what_waits_too_long_or_overflows_leaves_counted():
    join = Join(window_s=10, max_pending=2)
    for i in range(3):  # the third pushes the oldest out
        join.score(f"e{i}", "1", 0.5, 0, 1_000 * i)
    assert join.expired == {SCORES: 1, LABELS: 0}
    join.label("x", True, 0, 5_000)
    join.expire(now_ms=12_000)  # e1 (read at 1 s) is 11 s old; e2 (2 s) and the label not
    assert join.pending() == {SCORES: 1, LABELS: 1}
    assert join.expired == {SCORES: 2, LABELS: 0}


def test_changes_write_what_waits_and_tombstone_what_left_after_being_written():
    join = Join(window_s=60, max_pending=10)
    join.score("a", "1", 0.25, 100, 101)
    join.score("b", "1", 0.5, 200, 201)
    join.label("b", True, 300, 301)  # b arrived and joined between two calls: never written
    assert dict(join.changes()) == {
        changelog_key(SCORES, "a"): Waiting(101, 100, "1", 0.25).to_bytes()
    }
    assert join.changes() == []  # nothing changed since
    join.label("a", False, 400, 401)  # a was written: now it leaves
    join.label("c", True, 500, 501)
    assert dict(join.changes()) == {
        changelog_key(SCORES, "a"): None,
        changelog_key(LABELS, "c"): Waiting(501, 500, is_fraud=True).to_bytes(),
    }


def test_a_waiting_record_survives_its_changelog():
    waiting = Waiting(1_700_000_000_456, 1_700_000_000_123, "12", 0.123456789, True)
    assert Waiting.from_bytes(waiting.to_bytes()) == waiting


events = st.lists(
    st.tuples(
        st.sampled_from([SCORES, LABELS]),
        st.integers(0, 30),  # event id: repeats make duplicates and joins
        st.integers(0, 10_000),  # arrival ms
        st.booleans(),  # a checkpoint (changes written) after this event
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(events, st.integers(1, 8), st.integers(0, 12_000))
def test_a_restart_from_the_changelog_continues_as_if_never_stopped(steps, max_pending, now):
    """Apply events to one join, writing changes at the checkpoints into a log; a second
    join restored from the log after the last checkpoint must hold what the first held.
    """
    live = Join(window_s=5, max_pending=max_pending)
    log: list[tuple[bytes, bytes | None]] = []
    for side, n, at_ms, checkpoint in steps:
        if side == SCORES:
            live.score(f"e{n}", "v", n / 31, n, at_ms)
        else:
            live.label(f"e{n}", n % 2 == 0, n, at_ms)
        if checkpoint:
            live.expire(now)
            log.extend(live.changes())
    log.extend(live.changes())
    restored = Join(window_s=5, max_pending=max_pending)
    restored.restore(log)
    assert restored.pending() == live.pending()
    for side in (SCORES, LABELS):
        assert dict(restored._waiting[side]) == dict(live._waiting[side])
    # and what it writes from here on tombstones exactly the records the log holds
    for side, waiting in list(live._waiting.items()):
        for event_id in list(waiting):
            if side == SCORES:
                restored.label(event_id, True, 0, 0)
            else:
                restored.score(event_id, "v", 0.5, 0, 0)
    tombstones = {key for key, value in restored.changes() if value is None}
    latest = dict(log)
    assert tombstones == {key for key, value in latest.items() if value is not None}


def test_two_joins_share_one_changelog_and_each_restores_its_own():
    champion, challenger = Join(3600, 10), Join(3600, 10, prefix=b"c")
    champion.score("e1", "1", 0.2, 100, 1_000)
    challenger.score("e1", "2", 0.9, 100, 1_000)
    challenger.label("e2", True, 200, 1_000)
    records = champion.changes() + challenger.changes()
    assert sorted(key for key, _ in records) == [b"cle2", b"cse1", b"se1"]
    again_champion, again_challenger = Join(3600, 10), Join(3600, 10, prefix=b"c")
    assert again_champion.restore(records) == 1 and again_challenger.restore(records) == 2
    assert again_champion.label("e1", True, 300, 2_000).version == "1"
    assert again_challenger.label("e1", True, 300, 2_000).version == "2"
    assert again_challenger.score("e2", "2", 0.9, 150, 2_000).is_fraud

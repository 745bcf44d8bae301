"""User state bytes, the store's eviction and changelog records, restore, and replays."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.serve.events import ClickEvent
from pipeline.serve.features import FeatureUpdater, compute_features
from pipeline.serve.state import FeatureStore, UserState
from pipeline.serve.state.changes import StateChange, StateChanges
from pipeline.serve.state.pseudonym import Pseudonyms
from pipeline.serve.state.reference import LAST_TIME, OFFSET
from pipeline.training.generator import GeneratorConfig, generate
from tests.pipeline.sample import NOW_MS, click_record

PSEUDONYMS = Pseudonyms.ephemeral()  # one key for every updater, so restored state matches

EVENT_TYPES = ["product_view", "search", "add_to_cart", "checkout", "purchase", "login"]

events_strategy = st.lists(
    st.builds(
        lambda dt, kind, item, device, card, amount: ClickEvent(
            **click_record(
                event_time=NOW_MS + dt,
                event_type=kind,
                item_id=item,
                device_id=device,
                card_fingerprint=card,
                payment_amount=amount,
            )
        ),
        st.integers(-600_000, 7_200_000),
        st.sampled_from(EVENT_TYPES),
        st.one_of(st.none(), st.integers(-(2**40), 2**40)),
        st.one_of(st.none(), st.sampled_from(["", "d1", "d2", "d3"])),
        st.one_of(st.none(), st.text(max_size=8)),
        st.one_of(st.none(), st.floats(0, 1e4)),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=60, deadline=None)
@given(events=events_strategy, split=st.integers(0, 80))
def test_state_bytes_round_trip_and_carry_on_exactly(events, split):
    split = min(split, len(events))
    store = FeatureStore(history_length=10)
    updater = FeatureUpdater(store, PSEUDONYMS, 1800)
    updater.process(events[:split])
    restored = FeatureStore(history_length=10)
    for change in store.take_changes():
        assert change.value is not None
        assert UserState.from_bytes(change.value).to_bytes() == change.value
        restored.restore(change.partition, change.key.decode(), change.value)
    after_original = updater.process(events[split:])
    after_restored = FeatureUpdater(restored, PSEUDONYMS, 1800).process(events[split:])
    assert np.array_equal(after_original.numeric, after_restored.numeric)
    assert np.array_equal(after_original.history_items, after_restored.history_items)


def test_bytes_it_did_not_write_are_refused():
    for data in (b"", b"\x07abc", UserState(NOW_MS).to_bytes() + b"x"):
        try:
            UserState.from_bytes(data)
        except ValueError:
            continue
        raise AssertionError(f"accepted {data!r}")


def event(seconds=0.0, user="u1", offset=-1, partition=0, **changes):
    return ClickEvent(
        **click_record(event_time=NOW_MS + int(seconds * 1000), user_id=user, **changes),
        partition=partition,
        offset=offset,
    )


def test_idle_users_are_evicted_by_event_time_and_leave_tombstones():
    store = FeatureStore(history_length=5, ttl_s=3600)
    updater = FeatureUpdater(store, PSEUDONYMS, 1800)
    updater.process([event(0, "old"), event(10, "kept")])
    store.take_changes()
    updater.process([event(3605, "new")])  # partition time moves past old's TTL
    store.evict()
    assert store.users() == 2 and store.evicted == 1
    changes = {c.key.decode(): c.value for c in store.take_changes()}
    assert changes["old"] is None and changes["new"] is not None
    assert store.peek(0, "old") is None and store.peek(0, "kept") is not None


def test_the_least_recently_updated_go_first_above_max_users():
    store = FeatureStore(history_length=5, max_users=2)
    updater = FeatureUpdater(store, PSEUDONYMS, 1800)
    updater.process([event(0, "a"), event(1, "b"), event(2, "a"), event(3, "c")])
    store.evict()
    assert store.peek(0, "b") is None
    assert store.peek(0, "a") is not None and store.peek(0, "c") is not None


def test_restore_applies_records_in_order_and_tombstones_delete():
    source = FeatureStore(history_length=5)
    FeatureUpdater(source, PSEUDONYMS, 1800).process([event(0, "a"), event(5, "b")])
    records = {c.key.decode(): c.value for c in source.take_changes()}
    store = FeatureStore(history_length=5)
    store.restore(0, "a", records["a"])
    store.restore(0, "b", records["b"])
    store.restore(0, "a", None)
    assert store.users() == 1
    assert store.peek(0, "a") is None
    assert store.peek(0, "b").ints[LAST_TIME] == NOW_MS + 5000


def test_replayed_events_already_in_the_state_are_skipped():
    store = FeatureStore(history_length=5)
    updater = FeatureUpdater(store, PSEUDONYMS, 1800)
    first = [event(i, offset=10 + i) for i in range(3)]
    updater.process(first)
    assert store.peek(0, "u1").ints[OFFSET] == 12
    replay = [*first, event(3, offset=13)]
    assert updater.fresh(replay) == [replay[-1]]
    assert updater.fresh([event(0, "other", offset=1)])  # unknown users are always fresh


def test_late_events_are_scored_but_do_not_change_the_state():
    store = FeatureStore(history_length=5)
    updater = FeatureUpdater(store, PSEUDONYMS, 1800, allowed_lateness_s=600)
    updater.process([event(0, item_id=1), event(3600, item_id=2)])
    before = store.peek(0, "u1").to_bytes()
    batch = updater.process([event(100, item_id=3, offset=7)])  # 3500 s behind: late
    assert updater.late == 1 and len(batch.numeric) == 1
    state = store.peek(0, "u1")
    assert state.ints[OFFSET] == 7  # a replay of it is still skipped
    state.ints[OFFSET] = -1
    assert state.to_bytes() == before
    within = updater.process([event(3300, item_id=4)])  # 300 s behind: folded in
    assert updater.late == 1 and len(within.numeric) == 1
    assert list(store.peek(0, "u1").history)[-2:] == [4, 2]


def test_features_do_not_depend_on_how_partitions_move():
    events = [
        dataclasses.replace(ClickEvent(**record), offset=i)
        for i, (record, _) in enumerate(generate(GeneratorConfig(events=2000, users=40)))
    ]
    reference = compute_features(events, 10, 1800).numeric
    changelog = {}  # what the compacted topic keeps: the latest record per user
    updater = FeatureUpdater(FeatureStore(10), PSEUDONYMS, 1800)
    rows = []
    for start in range(0, len(events), 150):
        rows.append(updater.process(updater.fresh(events[start : start + 150])).numeric)
        for change in updater.store.take_changes():
            changelog[(change.partition, change.key.decode())] = change.value
        # a rebalance: this process lets go, the next one restores from the changelog
        store = FeatureStore(10)
        for (partition, user_id), value in changelog.items():
            store.restore(partition, user_id, value)
        updater = FeatureUpdater(store, PSEUDONYMS, 1800)
    assert np.array_equal(np.concatenate(rows), reference)


def state_changes(before, middle, after):
    """`middle` (partition, key, value) joined as `UserTable.take_changes` joins them."""
    keys, data = [b""], [b""]
    key_bounds, bounds = [0], [0]
    for _, key, value in middle:
        keys.append(key)
        data.append(value)
        key_bounds.append(key_bounds[-1] + len(key))
        bounds.append(bounds[-1] + len(value))
    partitions = [p for p, _, _ in middle]
    return StateChanges(
        before, partitions, b"".join(keys), key_bounds, b"".join(data), bounds, after
    )


changes_strategy = st.lists(
    st.builds(StateChange, st.integers(0, 11), st.binary(max_size=6), st.binary(max_size=9))
)


@given(
    before=st.lists(st.builds(StateChange, st.integers(0, 11), st.binary(max_size=4), st.none())),
    middle=changes_strategy,
    after=changes_strategy,
    start=st.integers(-12, 12) | st.none(),
    stop=st.integers(-12, 12) | st.none(),
    step=st.sampled_from([None, 1, 2, -1, 3]),
)
def test_state_changes_read_as_the_list_of_their_records(before, middle, after, start, stop, step):
    want = before + [StateChange(*record) for record in middle] + after
    got = state_changes(before, middle, after)
    assert len(got) == len(want)
    assert list(got) == want and got == want and want == got
    assert got[start:stop:step] == want[start:stop:step]
    for i in range(-len(want), len(want)):
        assert got[i] == want[i]
    with pytest.raises(IndexError):
        got[len(want)]
    assert got != [*want, StateChange(0, b"x", None)]

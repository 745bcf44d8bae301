"""The user table's restore, erasure and control records (its folding is in test_fold.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.serve.features import Featurizer
from pipeline.serve.state import Pseudonyms, UserTable
from pipeline.serve.state.changes import StateChange
from pipeline.serve.state.reference import SESSION_EVENTS, FeatureStore, UserState
from pipeline.serve.state.table import CONTROL
from pipeline.tools.state_bench import full_user
from tests.pipeline.columnar import columns_of
from tests.pipeline.sample import click_record

MARK = CONTROL + b"test-mark"


def table_with(*users: str) -> tuple[UserTable, Featurizer]:
    table = UserTable(5)
    featurizer = Featurizer(table, Pseudonyms.ephemeral(), 1800)
    records = [click_record(user_id=u, event_id=f"e{i}") for i, u in enumerate(users)]
    featurizer.process(columns_of(*records), np.arange(len(records), dtype=np.int64))
    table.take_changes()
    return table, featurizer


HISTORY = 5
STATES = [
    full_user(random.Random(seed), 1_700_000_000_000, seed % (HISTORY + 1)).to_bytes()
    for seed in range(6)
]  # small ones stay inline in their slot, the longer ones take a pool row
# A changelog record: (partition, user, which of STATES, or None for a tombstone). A fetched
# batch holds runs of one partition.
run = st.tuples(
    st.integers(0, 2),
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d", "é"]), st.none() | st.integers(0, 5)),
        max_size=12,
    ),
)
batch = run.map(lambda r: [(r[0], user, state) for user, state in r[1]])


def sum_runs(runs: list[list[tuple[int, str, int | None]]]) -> list[tuple[int, str, int | None]]:
    return [record for one in runs for record in one]


def restore_both(
    table: UserTable, store: FeatureStore, records: list[tuple[int, str, int | None]]
) -> None:
    """One batch into the table, record by record into the reference store."""
    values = [None if state is None else STATES[state] for _, _, state in records]
    table.restore([p for p, _, _ in records], [u.encode() for _, u, _ in records], values)
    for (partition, user, _), value in zip(records, values, strict=True):
        store.restore(partition, user, value)


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(batch, max_size=4).map(sum_runs), min_size=1, max_size=4))
def test_a_restored_batch_equals_the_records_applied_one_by_one(
    batches: list[list[tuple[int, str, int | None]]],
) -> None:
    # Repeated keys, tombstones of held and unknown users, partitions interleaved, slots
    # freed by one batch and reused by the next: only each key's last record may count.
    table, store = UserTable(HISTORY), FeatureStore(HISTORY)
    for batch in batches:
        restore_both(table, store, batch)
        assert table.users() == store.users()
        assert_memory_estimate(table)
        for partition in store.partitions():
            users = list(store._partitions[partition])
            assert [k.decode() for k in table.recency(partition)] == users
            for user in users:
                state = store.peek(partition, user)
                assert state is not None
                slot = table.slot_of(partition, user.encode())
                buffer, _ = table.encode(np.array([slot]))
                assert buffer.tobytes() == state.to_bytes()


def assert_memory_estimate(table: UserTable) -> None:
    """The key index is whole, and its counts kept as keys come and go equal a recount:
    every held slot's key finds that slot, the users per partition and the key bytes add up,
    and the estimate is the sum of its parts.
    """
    c, index = table.columns, table._index
    held = np.flatnonzero(c.held[: index.unused])
    keys = index.keys(held, c)
    for slot, partition, key in zip(held.tolist(), c.partition[held].tolist(), keys, strict=True):
        assert table.slot_of(partition, key) == slot
    assert len(held) == table.users() == int((table._index.table >= 0).sum())
    for partition in table.partitions():
        assert int(index.counts[partition]) == int((c.partition[held] == partition).sum())
    assert index.key_bytes() == sum(map(len, keys))
    slot = c.nbytes() // len(c.ints)
    pooled = table.pool.row_bytes() * table.pool.used()
    assert table.estimate_bytes() == slot * index.unused + pooled + index.nbytes()


def test_a_batch_with_a_corrupt_record_is_refused_whole() -> None:
    table, store = UserTable(HISTORY), FeatureStore(HISTORY)
    restore_both(table, store, [(0, "a", 1)])
    truncated = STATES[2][:-1]
    with pytest.raises(ValueError, match="changelog record 2 of the batch"):
        table.restore([0, 0, 0], [b"b", b"a", b"c"], [STATES[3], None, truncated])
    assert table.users() == 1 and table.recency(0) == [b"a"]
    assert table.slot_of(0, b"b") == -1


def test_forget_drops_the_user_with_a_tombstone_and_leaves_the_others() -> None:
    table, _ = table_with("alice", "bob", "carol")
    assert table.forget(0, b"bob")
    assert not table.forget(0, b"bob") and not table.forget(1, b"alice")
    assert table.users() == 2
    assert_memory_estimate(table)
    assert table.recency(0) == [b"alice", b"carol"]
    assert table.take_changes() == [StateChange(0, b"bob", None)]


def test_a_forgotten_user_comes_back_as_new_and_is_written_not_tombstoned() -> None:
    table, featurizer = table_with("alice", "alice", "bob")
    table.forget(0, b"alice")
    columns = columns_of(click_record(user_id="alice", event_id="again"))
    featurizer.process(columns, np.arange(1, dtype=np.int64))
    (change,) = table.take_changes()
    assert change.key == b"alice" and change.value is not None
    assert UserState.from_bytes(change.value).ints[SESSION_EVENTS] == 1  # a new user


def test_control_records_follow_the_user_records_and_go_with_their_partition() -> None:
    table, featurizer = table_with("alice", "bob")
    table.forget(0, b"alice")
    table.put_control(0, MARK, b"\x00" * 7 + b"\x05")
    table.put_control(1, MARK, b"x")
    featurizer.process(columns_of(click_record(user_id="carol")), np.arange(1, dtype=np.int64))
    changes = table.take_changes()
    assert [c.key for c in changes if c.partition == 0] == [b"alice", b"carol", MARK]
    assert table.take_changes() == []
    table.put_control(1, MARK, b"y")
    table.drop_partition(1)
    assert table.take_changes() == []

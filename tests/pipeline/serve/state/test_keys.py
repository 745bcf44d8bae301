"""The user table's key index: a dict of (partition, key) → slot is its oracle."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.serve.state.keys import hash_key, table_size
from pipeline.serve.state.table import UserTable
from tests.pipeline.serve.state.test_table import assert_memory_estimate

# Few distinct keys, so that adds meet held keys and removals meet keys added back; long
# ones, so that the arena fills and is compacted; bytes that are not UTF-8, and the empty
# key, since a restored changelog's keys are not checked.
key = st.sampled_from([b"", b"a", b"b", b"\xff\x00", "é".encode(), b"k" * 300]) | st.binary(
    min_size=1, max_size=40
)
add = st.tuples(st.just("add"), st.lists(st.tuples(st.integers(0, 3), key), max_size=30))
forget = st.tuples(st.just("forget"), st.tuples(st.integers(0, 3), key))
drop = st.tuples(st.just("drop"), st.integers(0, 3))


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.one_of(add, forget, drop), max_size=40))
def test_slots_follow_a_dict_through_adds_removals_growth_and_compaction(
    ops: list[tuple[str, object]],
) -> None:
    table = UserTable(5, capacity=2)  # a table of 16 entries at first: keys collide
    oracle: dict[tuple[int, bytes], int] = {}
    for op, arg in ops:
        if op == "add":
            pairs = arg
            assert isinstance(pairs, list)
            partitions = np.array([p for p, _ in pairs], dtype=np.int64)
            slots = table.slots(partitions, [k for _, k in pairs]).tolist()
            for (partition, k), slot in zip(pairs, slots, strict=True):
                assert oracle.setdefault((partition, k), slot) == slot  # held keys keep theirs
            assert len(set(oracle.values())) == len(oracle)  # one user per slot
        elif op == "forget":
            assert isinstance(arg, tuple)
            partition, k = arg
            assert table.forget(partition, k) == ((partition, k) in oracle)
            oracle.pop((partition, k), None)
        else:
            assert isinstance(arg, int)
            table.drop_partition(arg)
            oracle = {where: slot for where, slot in oracle.items() if where[0] != arg}
        for (partition, k), slot in oracle.items():
            assert table.slot_of(partition, k) == slot
        assert table.users() == len(oracle)
        assert_memory_estimate(table)


def homes(table: UserTable, home: int, count: int) -> list[bytes]:
    """`count` keys of partition 0 whose probe starts at `home` in `table`'s index."""
    size, secret = len(table._index.table), table._index.secret
    found: list[bytes] = []
    for i in range(100_000):
        k = f"user-{i}".encode()
        h = int(hash_key(secret, np.frombuffer(k, dtype=np.uint8), 0, len(k), 0))
        if h & (size - 1) == home:
            found.append(k)
            if len(found) == count:
                return found
    raise AssertionError("no such keys")


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_a_removal_in_a_probe_chain_that_wraps_keeps_the_rest_found(order: tuple[int, ...]) -> None:
    # Table of 16 entries: three keys at home 15 take 15, 0 and 1; one at home 0 goes on to 2.
    table = UserTable(5, capacity=8)
    assert len(table._index.table) == 16
    keys = [*homes(table, 15, 3), homes(table, 0, 1)[0]]
    table.slots(np.zeros(4, dtype=np.int64), keys)
    assert [table._index.table[p] >= 0 for p in (15, 0, 1, 2)] == [True] * 4
    held = set(keys)
    for gone in order:
        assert table.forget(0, keys[gone])
        held.discard(keys[gone])
        for k in keys:
            assert (table.slot_of(0, k) >= 0) == (k in held)
        assert int((table._index.table >= 0).sum()) == len(held)
    assert table.users() == 0


def test_the_table_is_sized_by_the_users_held_at_most_half_full() -> None:
    table = UserTable(5, capacity=100_000)
    assert len(table._index.table) == 16
    for first in range(0, 5000, 500):  # batches, as a consumer's
        keys = [f"user-{i}".encode() for i in range(first, first + 500)]
        table.slots(np.zeros(len(keys), dtype=np.int64), keys)
        assert 2 * table.users() <= len(table._index.table) <= 4 * (table.users() + 500)
    assert len(table._index.table) == table_size(5000)
    assert_memory_estimate(table)


def test_removing_a_slot_twice_or_one_not_held_changes_nothing_more() -> None:
    table = UserTable(5)
    slots = table.slots(np.zeros(3, dtype=np.int64), [b"a", b"b", b"c"])
    table._remove(np.array([slots[1], slots[1], 99], dtype=np.int64))
    assert table.users() == 2 and table.slot_of(0, b"b") == -1
    assert table._index.key_bytes() == 2

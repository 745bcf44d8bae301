"""The user table's erasure and control records (its folding is in test_fold.py)."""

from __future__ import annotations

import numpy as np

from pipeline.serve.features import Featurizer, Pseudonyms, UserTable
from pipeline.serve.features.state import SESSION_EVENTS, StateChange, UserState
from pipeline.serve.features.table import CONTROL
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


def test_forget_drops_the_user_with_a_tombstone_and_leaves_the_others() -> None:
    table, _ = table_with("alice", "bob", "carol")
    assert table.forget(0, b"bob")
    assert not table.forget(0, b"bob") and not table.forget(1, b"alice")
    assert table.users() == 2
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

"""Local snapshots of a partition's state: the table's export and load, and the file's
checks (the restore that reads one and the changelog's tail is in test_changelog.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.serve.state import UserTable, snapshot
from pipeline.serve.state.snapshot import Source
from pipeline.serve.state.table import CONTROL
from tests.pipeline.columnar import columns_of
from tests.pipeline.sample import click_record
from tests.pipeline.serve.state.test_table import (
    HISTORY,
    STATES,
    assert_memory_estimate,
    batch,
    sum_runs,
    table_with,
)

MARK = CONTROL + b"test-mark"
SOURCE = Source("cluster-a", "g.in.changelog", 0)  # table_with fills partition 0


def states_of(table: UserTable, partition: int) -> list[tuple[bytes, bytes]]:
    """(key, changelog value) of the partition's users, least recently updated first."""
    keys = table.recency(partition)
    slots = np.array([table.slot_of(partition, key) for key in keys], dtype=np.int64)
    values, starts = table.encode(slots)
    data = values.tobytes()
    return [(key, data[a:b]) for key, a, b in zip(keys, starts[:-1], starts[1:], strict=True)]


def restored(records: list[tuple[int, str, int | None]]) -> UserTable:
    table = UserTable(HISTORY)
    values = [None if state is None else STATES[state] for _, _, state in records]
    table.restore([p for p, _, _ in records], [u.encode() for _, u, _ in records], values)
    return table


@settings(max_examples=100, deadline=None)
@given(batches=st.lists(st.lists(batch, max_size=4).map(sum_runs), min_size=1, max_size=3))
def test_a_partition_saved_and_loaded_has_the_same_states_order_and_controls(
    batches: list[list[tuple[int, str, int | None]]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    table = restored([])
    for records in batches:  # repeated keys, tombstones, slots freed and reused
        values = [None if state is None else STATES[state] for _, _, state in records]
        table.restore([p for p, _, _ in records], [u.encode() for _, u, _ in records], values)
    table.keep_controls({(1, MARK): b"restored"})
    directory = tmp_path_factory.mktemp("snapshots")
    for partition in range(3):
        source = Source("c", "t", partition)
        state = table.export(partition)
        assert state is not None
        snapshot.save(directory, source, 10, state)
        read = snapshot.read(directory, source, 0, 10, 3600)
        assert read is not None and read.offset == 10
        assert not snapshot.path_of(directory, source).exists()  # read once
        loaded_into = UserTable(HISTORY)
        loaded_into.load(partition, read.state)
        assert loaded_into.users() == len(table.recency(partition))
        assert states_of(loaded_into, partition) == states_of(table, partition)
        assert read.state.controls == ({MARK: b"restored"} if partition == 1 else {})
        again = loaded_into.export(partition)  # the loaded table exports the same
        assert again is not None and again.values.tobytes() == state.values.tobytes()


def test_a_partition_with_changes_the_changelog_lacks_exports_nothing() -> None:
    table, featurizer = table_with("alice", "bob")
    assert table.export(0) is not None
    featurizer.process(columns_of(click_record(user_id="carol")), np.arange(1, dtype=np.int64))
    assert table.export(0) is None  # carol's record is not taken yet
    table.take_changes()
    assert table.export(0) is not None
    table.forget(0, b"alice")
    assert table.export(0) is None  # her tombstone is pending
    table.take_changes()
    table.put_control(0, MARK, b"\x01")
    assert table.export(0) is None
    table.take_changes()
    state = table.export(0)
    assert state is not None and state.keys() == [b"bob", b"carol"]
    assert state.controls == {MARK: b"\x01"}  # the latest control records go with it
    table.slots(np.zeros(1, dtype=np.int64), [b"dave"])  # allocated, not folded in yet
    assert table.export(0) is None
    table.drop_partition(0)
    empty = table.export(0)
    assert empty is not None and empty.keys() == [] and empty.controls == {}


def saved(tmp_path: Path, offset: int = 5) -> Path:
    table, _ = table_with("alice", "bob")
    state = table.export(0)
    assert state is not None
    return snapshot.save(tmp_path, SOURCE, offset, state)


def load_refused(tmp_path: Path, low: int = 0, high: int = 9, max_age_s: float = 60) -> str:
    """Read the saved snapshot, expecting a refusal: the file is gone. Returns the reason
    logged.
    """
    with structlog.testing.capture_logs() as entries:
        assert snapshot.read(tmp_path, SOURCE, low, high, max_age_s) is None
    assert not snapshot.path_of(tmp_path, SOURCE).exists()
    (entry,) = [e for e in entries if e["event"] == "snapshot_refused"]
    assert entry["partition"] == SOURCE.partition and "alice" not in str(entry)
    return str(entry["reason"])


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        (-1, "checksum mismatch"),  # a value's last byte
        (-200, "checksum mismatch"),
        (len(snapshot.MAGIC) - 1, "not a snapshot file"),
    ],
)
def test_a_damaged_file_is_refused_and_deleted(tmp_path: Path, where: int, reason: str) -> None:
    path = saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[where] ^= 0x40
    path.write_bytes(bytes(data))
    assert reason in load_refused(tmp_path)


def test_a_truncated_or_empty_file_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-1])
    assert "do not fill the file" in load_refused(tmp_path)
    saved(tmp_path).write_bytes(b"")
    load_refused(tmp_path)
    saved(tmp_path).write_bytes(snapshot.MAGIC + b"\x05\x00\x00\x00{]")
    assert "unreadable header" in load_refused(tmp_path)


def test_a_snapshot_outside_the_changelog_is_refused(tmp_path: Path) -> None:
    saved(tmp_path, offset=5)
    assert "outside the changelog's [0, 4]" in load_refused(tmp_path, high=4)  # recreated
    saved(tmp_path, offset=5)
    assert "outside the changelog's [6, 9]" in load_refused(tmp_path, low=6)  # records deleted


def test_a_snapshot_of_another_changelog_is_refused(tmp_path: Path) -> None:
    table, _ = table_with("alice")
    state = table.export(0)
    assert state is not None
    other = Source("cluster-b", SOURCE.topic, SOURCE.partition)  # the same name elsewhere
    snapshot.save(tmp_path, other, 5, state)
    assert "written for" in load_refused(tmp_path)


def test_an_old_snapshot_is_refused_and_pruned(tmp_path: Path) -> None:
    saved(tmp_path)
    time.sleep(0.01)
    assert "past features.snapshot_max_age_s" in load_refused(tmp_path, max_age_s=0.001)
    path = saved(tmp_path)
    leftover = tmp_path / "t.0.snapshot.123.tmp"  # a crash mid-write
    leftover.write_bytes(b"partial")
    assert snapshot.prune(tmp_path, 60) == 0
    unrelated = tmp_path / "someone-else.tmp"
    unrelated.write_bytes(b"not ours")
    hour_ago = time.time() - 3600
    for old in (path, leftover, unrelated):
        os.utime(old, (hour_ago, hour_ago))
    assert snapshot.prune(tmp_path, 60) == 2
    assert list(tmp_path.iterdir()) == [unrelated]
    assert snapshot.prune(tmp_path / "missing", 60) == 0


def test_past_the_size_limit_the_oldest_snapshots_go(tmp_path: Path) -> None:
    table, _ = table_with("alice", "bob")
    state = table.export(0)
    assert state is not None
    paths = [snapshot.save(tmp_path, Source("c", "t", p), 5, state) for p in range(3)]
    now = time.time()
    for age, path in zip((30, 10, 20), paths, strict=True):
        os.utime(path, (now - age, now - age))
    size = paths[0].stat().st_size
    assert snapshot.prune(tmp_path, 3600, max_bytes=3 * size) == 0
    assert snapshot.prune(tmp_path, 3600, max_bytes=2 * size - 1) == 2  # the two oldest
    assert list(tmp_path.iterdir()) == [paths[1]]


def test_a_partition_already_held_is_not_overwritten(tmp_path: Path) -> None:
    saved(tmp_path)
    read = snapshot.read(tmp_path, SOURCE, 0, 9, 60)
    assert read is not None
    table, _ = table_with("carol")
    with pytest.raises(ValueError, match="already holds 1 users"):
        table.load(0, read.state)
    assert table.recency(0) == [b"carol"]  # untouched


def test_values_that_are_not_user_states_load_nothing() -> None:
    table, _ = table_with("alice", "bob")
    state = table.export(0)
    assert state is not None
    damaged = state.values.copy()
    damaged[state.starts[1]] = 7  # bob's format version
    for bad in (
        state._replace(values=damaged),
        state._replace(  # a key twice
            key_bytes=np.frombuffer(b"alicealice", dtype=np.uint8),
            key_starts=np.array([0, 5, 10], dtype=np.int64),
        ),
    ):
        fresh = UserTable(HISTORY)
        with pytest.raises(ValueError, match="not a set of user states"):
            fresh.load(0, bad)
        assert fresh.users() == 0
        assert_memory_estimate(fresh)  # the key index too


def test_a_missing_snapshot_reads_nothing(tmp_path: Path) -> None:
    assert snapshot.read(tmp_path, SOURCE, 0, 9, 60) is None


def test_the_users_a_snapshot_holds_are_known_from_its_header(tmp_path: Path) -> None:
    assert snapshot.users_in(tmp_path, SOURCE) == 0  # none
    path = saved(tmp_path)
    assert snapshot.users_in(tmp_path, SOURCE) == 2
    path.write_bytes(snapshot.MAGIC + b"\x05\x00")  # a torn header: read() refuses it
    assert snapshot.users_in(tmp_path, SOURCE) == 0

"""A user's state in bytes: the changelog value and the snapshot's, written and read by
kernels straight from and into the table's columns. The format is the reference's
(`reference.UserState.encode`): the fixed header, then the history, items and seen values.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import numpy as np

from pipeline.serve.kernel import Bytes, Int64s, inline_kernel, kernel
from pipeline.serve.state.layout import (
    COUNTS_BYTES,
    HEADER_BYTES,
    KINDS,
    Slots,
    hashes_of,
    history_of,
    items_of,
    promote,
    times_of,
)
from pipeline.serve.state.recency import Recency, append, linked, unlink
from pipeline.serve.state.reference import (
    FLOAT_SLOTS,
    FORMAT_VERSION,
    INT_SLOTS,
    MAX_SEEN,
    MAX_SESSION_ITEMS,
)


@inline_kernel
def _count(buffer: Bytes, at: int, width: int) -> int:
    value = 0
    for k in range(width):
        value |= int(np.int64(buffer[at + k]) << (8 * k))
    if width == 4 and value >= 2**31:
        value -= 2**32
    return value


@kernel
def encode_users(slots: Int64s, starts: Int64s, buffer: Bytes, table: Slots) -> None:
    """`UserState.to_bytes` of each slot, at `starts`. The parts are written through typed
    views of the output's bytes (unaligned, which numba and x86-64 and ARM64 allow): a
    value written a byte at a time cost about 1 ns a byte, 1.3 µs a full-history record.
    """
    ints, floats, v = table.ints, table.floats, table.var
    history_len, items_len, seen_len = table.history_len, table.items_len, table.seen_len
    for i in range(len(slots)):
        s = slots[i]
        at = starts[i]
        buffer[at] = FORMAT_VERSION
        at += 1
        out = buffer[at : at + 8 * INT_SLOTS].view(np.int64)
        for k in range(INT_SLOTS):
            out[k] = ints[s, k]
        at += 8 * INT_SLOTS
        out_floats = buffer[at : at + 8 * FLOAT_SLOTS].view(np.float64)
        for k in range(FLOAT_SLOTS):
            out_floats[k] = floats[s, k]
        at += 8 * FLOAT_SLOTS
        counts = buffer[at : at + COUNTS_BYTES].view(np.uint16)
        n_history, n_items = history_len[s], items_len[s]
        counts[0], counts[1] = n_history, n_items
        for kind in range(KINDS):
            counts[2 + kind] = 2 * seen_len[s, kind]
        at += COUNTS_BYTES
        history, items = history_of(s, v), items_of(s, v)
        out_ints = buffer[at : at + 4 * n_history].view(np.int32)
        for k in range(n_history):
            out_ints[k] = history[k]
        at += 4 * n_history
        out_ints = buffer[at : at + 4 * n_items].view(np.int32)
        for k in range(n_items):
            out_ints[k] = items[k]
        at += 4 * n_items
        seen_hash, seen_time = hashes_of(s, v), times_of(s, v)
        for kind in range(KINDS):
            pairs = seen_len[s, kind]
            out = buffer[at : at + 16 * pairs].view(np.int64)
            for k in range(pairs):
                out[2 * k] = seen_hash[kind, k]
                out[2 * k + 1] = seen_time[kind, k]
            at += 16 * pairs


class PartitionState(NamedTuple):
    """A partition's users as changelog values, least recently updated first, with its
    latest control records: what `UserTable.export` gives and `UserTable.load` takes.
    """

    key_bytes: Bytes  # the keys joined
    key_starts: Int64s  # (users + 1,): key i is key_bytes[key_starts[i]:key_starts[i + 1]]
    values: Bytes  # the values joined
    starts: Int64s  # (users + 1,): value i is values[starts[i]:starts[i + 1]]
    controls: dict[bytes, bytes]

    @property
    def users(self) -> int:
        """How many users it holds."""
        return len(self.starts) - 1

    def keys(self) -> list[bytes]:
        """The keys, as bytes (tests, and the rare reader that needs objects)."""
        blob, bounds = self.key_bytes.tobytes(), self.key_starts.tolist()
        return [blob[a:b] for a, b in pairwise(bounds)]


def holds_user_states(state: PartitionState) -> bool:
    """Whether every value of an export is a user state this build reads (no table needed:
    a restore checks a snapshot on the thread that reads it).
    """
    return bool(check_values(state.values, state.starts) < 0)


@kernel
def check_values(buffer: Bytes, starts: Int64s) -> int:
    """-1 when every value is a user state this build reads, else the first one's index."""
    for j in range(len(starts) - 1):
        at, end = starts[j], starts[j + 1]
        if end - at < HEADER_BYTES or buffer[at] != FORMAT_VERSION:
            return j
        at += HEADER_BYTES - COUNTS_BYTES
        n_history = _count(buffer, at, 2)
        n_items = _count(buffer, at + 2, 2)
        total = 4 * (n_history + n_items)
        for kind in range(KINDS):
            n_seen = _count(buffer, at + 4 + 2 * kind, 2)
            total += 8 * n_seen
            if n_seen % 2 or n_seen > 2 * MAX_SEEN:
                return j
        if end - at - COUNTS_BYTES != total or n_history % 2 or n_items > MAX_SESSION_ITEMS:
            return j
    return -1


@kernel
def restore_users(
    ops: Int64s,
    which: Int64s,
    buffer: Bytes,
    starts: Int64s,
    history_length: int,
    table: Slots,
    r: Recency,
    n_seen: Int64s,
) -> None:
    """Apply restore `ops` in order, a put taking the state in value `which[i]` (values
    `check_values` passed); `n_seen` (KINDS) is its working space.
    """
    ints, floats, v = table.ints, table.floats, table.var
    history_len, items_len, seen_len = table.history_len, table.items_len, table.seen_len
    pending, changed, prev, nxt, partition, ends = (
        r.pending, r.changed, r.prev, r.next, r.partition, r.ends,
    )  # fmt: skip
    capacity = 2 * history_length
    for i in range(len(ops)):
        op = ops[i]
        if op < 0:
            slot = -op - 1
            unlink(slot, prev, nxt, ends, partition[slot])
            changed[slot] = pending[slot] = False
            continue
        slot = op
        at = starts[which[i]] + 1  # read through typed views of the bytes, as `_encode`
        values = buffer[at : at + 8 * INT_SLOTS].view(np.int64)
        for k in range(INT_SLOTS):
            ints[slot, k] = values[k]
        at += 8 * INT_SLOTS
        doubles = buffer[at : at + 8 * FLOAT_SLOTS].view(np.float64)
        for k in range(FLOAT_SLOTS):
            floats[slot, k] = doubles[k]
        at += 8 * FLOAT_SLOTS
        counts = buffer[at : at + COUNTS_BYTES].view(np.uint16)
        n_history, n_items = int(counts[0]), int(counts[1])
        most_seen = 0
        for kind in range(KINDS):
            n_seen[kind] = counts[2 + kind]
            most_seen = max(most_seen, n_seen[kind])
        at += COUNTS_BYTES
        skip = max(0, n_history - capacity)  # a longer history than this build keeps
        fits = (
            n_history - skip <= v.history.shape[1]
            and n_items <= v.items.shape[1]
            and most_seen // 2 <= v.seen_hash.shape[2]
        )
        if not fits:
            promote(slot, table)
        history, items = history_of(slot, v), items_of(slot, v)
        seen_hash, seen_time = hashes_of(slot, v), times_of(slot, v)
        entries = buffer[at : at + 4 * n_history].view(np.int32)
        for k in range(n_history - skip):
            history[k] = entries[skip + k]
        history_len[slot] = n_history - skip
        at += 4 * n_history
        entries = buffer[at : at + 4 * n_items].view(np.int32)
        for k in range(n_items):
            items[k] = entries[k]
        items_len[slot] = n_items
        at += 4 * n_items
        for kind in range(KINDS):
            pairs = n_seen[kind] // 2
            values = buffer[at : at + 16 * pairs].view(np.int64)
            for k in range(pairs):
                seen_hash[kind, k] = values[2 * k]
                seen_time[kind, k] = values[2 * k + 1]
            at += 16 * pairs
            seen_len[slot, kind] = pairs
        pending[slot] = False
        p = partition[slot]
        if linked(slot, prev, ends, p):
            unlink(slot, prev, nxt, ends, p)
        append(slot, prev, nxt, ends, p)

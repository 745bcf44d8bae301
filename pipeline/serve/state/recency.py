"""Recency: each partition's users in a doubly linked list through the slots, least recently
updated first, so eviction walks from the old end. `touch` moves a slot to the recent end
(initialising a new user's first fields), `evict` picks the slots past the TTL or the cap.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from pipeline.serve.kernel import Bools, Int32s, Int64s, kernel
from pipeline.serve.state.layout import NO_SLOT, Slots
from pipeline.serve.state.reference import (
    COUNTER_TIME,
    FIRST_SEEN,
    LAST_TIME,
    NEVER,
    SESSION_EVENTS,
    SESSION_START,
    SESSION_VIEWS,
)


@kernel
def unlink(slot: int, prev: Int32s, nxt: Int32s, ends: Int32s, p: int) -> None:
    before, after = prev[slot], nxt[slot]
    if before == NO_SLOT:
        ends[p, 0] = after
    else:
        nxt[before] = after
    if after == NO_SLOT:
        ends[p, 1] = before
    else:
        prev[after] = before
    prev[slot] = nxt[slot] = NO_SLOT


@kernel
def append(slot: int, prev: Int32s, nxt: Int32s, ends: Int32s, p: int) -> None:
    tail = ends[p, 1]
    prev[slot] = tail
    nxt[slot] = NO_SLOT
    if tail == NO_SLOT:
        ends[p, 0] = slot
    else:
        nxt[tail] = slot
    ends[p, 1] = slot


@kernel
def linked(slot: int, prev: Int32s, ends: Int32s, p: int) -> bool:
    return bool(prev[slot] != NO_SLOT or ends[p, 0] == slot)


@kernel
def chain(head: int, nxt: Int32s, out: Int64s) -> int:
    """The slots of a partition's recency list from `head`, into `out`: how many, or -1
    when the list is longer than `out`.
    """
    slot, n = head, 0
    while slot != NO_SLOT:
        if n == len(out):
            return -1
        out[n] = slot
        n += 1
        slot = nxt[slot]
    return n


class Recency(NamedTuple):
    """The recency lists as kernels take them: per slot its links and flags, per partition
    its list's ends and newest event time. `UserTable.recency_view` makes one.
    """

    pending: Bools  # (capacity,): allocated, initialised by its first event
    changed: Bools  # (capacity,): a changelog record is due
    prev: Int32s  # (capacity,)
    next: Int32s  # (capacity,)
    partition: Int32s  # (capacity,)
    ends: Int32s  # (partitions, 2): the list's head and tail slots
    watermark: Int64s  # (partitions,): the newest event time


@kernel
def touch(slot: int, now_ms: int, table: Slots, r: Recency) -> bool:
    """`FeatureStore.get` without the return: a new user's first fields, then the slot moved
    to its partition's most recent end; True when the slot was newly flagged changed.
    """
    p = r.partition[slot]
    if r.pending[slot]:
        r.pending[slot] = False
        ints = table.ints
        ints[slot, :] = NEVER
        ints[slot, FIRST_SEEN] = ints[slot, SESSION_START] = ints[slot, COUNTER_TIME] = now_ms
        ints[slot, SESSION_EVENTS] = ints[slot, SESSION_VIEWS] = 0
        table.floats[slot, :] = 0.0
        table.history_len[slot] = table.items_len[slot] = 0
        table.seen_len[slot, :] = 0
    elif linked(slot, r.prev, r.ends, p):
        unlink(slot, r.prev, r.next, r.ends, p)
    append(slot, r.prev, r.next, r.ends, p)
    if now_ms > r.watermark[p]:
        r.watermark[p] = now_ms
    if r.changed[slot]:
        return False
    r.changed[slot] = True
    return True


@njit(cache=True, nogil=True)
def pick_evictions(
    order: Int64s, counts: Int64s, ttl_ms: float, max_users: float, ints: Int64s, r: Recency
) -> Int64s:
    """Unlink the users to evict; their slots, in eviction order. Compiled with reference
    counting (not a `kernel`): it returns an array it allocates.
    """
    changed, prev, nxt, ends, watermark = r.changed, r.prev, r.next, r.ends, r.watermark
    out = []
    for k in range(len(order)):
        p = order[k]
        horizon = watermark[p] - ttl_ms
        while ends[p, 0] != NO_SLOT and ints[ends[p, 0], LAST_TIME] < horizon:
            slot = ends[p, 0]
            unlink(slot, prev, nxt, ends, p)
            changed[slot] = False
            counts[k] -= 1
            out.append(slot)
    total = counts.sum()
    while total > max_users:
        largest = 0
        for k in range(1, len(order)):
            if counts[k] > counts[largest]:
                largest = k
        p = order[largest]
        slot = ends[p, 0]
        unlink(slot, prev, nxt, ends, p)
        changed[slot] = False
        counts[largest] -= 1
        total -= 1
        out.append(slot)
    result = np.empty(len(out), dtype=np.int64)
    for i in range(len(out)):
        result[i] = out[i]
    return result

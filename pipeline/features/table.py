"""Per-user state as columns: one row (slot) per user in fixed-width arrays, with a key → slot
index per partition. This is the serving store; `state.FeatureStore` and `UserState` are its
readable reference, and the changelog bytes are the same (`UserState.to_bytes`), so a
changelog written by either restores into the other.

Each slot holds the int64 and float64 slots of `state` (times, counts, decayed counters,
affinities), the recent (item, category) history as an int32 ring of `2 * history_length`
entries kept oldest first, the session's distinct items (up to MAX_SESSION_ITEMS), and per
seen kind (device, IP, country, card) up to MAX_SEEN (hash, last seen) pairs in arrival
order. A user costs the same bytes whatever their activity, and there is no Python object
per user except the key bytes and their slot in the index.

Least-recently-updated order, which eviction follows, is a doubly linked list through the
slots of each partition, as `FeatureStore`'s OrderedDicts are. Slot 0 is never a user's: it
is the scratch slot that scores a late event without changing its user.

Semantics that differ from the reference: a restored history longer than this build's
`2 * history_length` (the setting was lowered) keeps its newest entries.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from numba import njit

from pipeline.features.state import (
    FLOAT_SLOTS,
    FORMAT_VERSION,
    INT_SLOTS,
    LAST_TIME,
    MAX_SEEN,
    MAX_SESSION_ITEMS,
    NEVER,
    SEEN_KINDS,
    StateChange,
)

KINDS = len(SEEN_KINDS)
_HEADER = struct.Struct(f"<B{INT_SLOTS}q{FLOAT_SLOTS}d6H")
HEADER_BYTES = _HEADER.size
NO_SLOT = -1
SCRATCH = 0


@dataclass(slots=True)
class Columns:
    """The state arrays, slot-major. Kernels take them as arguments."""

    ints: np.ndarray  # int64 (capacity, INT_SLOTS)
    floats: np.ndarray  # float64 (capacity, FLOAT_SLOTS)
    history: np.ndarray  # int32 (capacity, 2 * history_length): item, category, ...
    history_len: np.ndarray  # int32 (capacity,): entries used (two per event)
    items: np.ndarray  # int32 (capacity, MAX_SESSION_ITEMS)
    items_len: np.ndarray  # int32 (capacity,)
    seen_hash: np.ndarray  # uint32 (capacity, KINDS, MAX_SEEN): CRC-32 of the value
    seen_time: np.ndarray  # int64 (capacity, KINDS, MAX_SEEN)
    seen_len: np.ndarray  # int32 (capacity, KINDS)
    pending: np.ndarray  # bool (capacity,): allocated, initialised by its first event
    changed: np.ndarray  # bool (capacity,): a changelog record is due
    prev: np.ndarray  # int32 (capacity,): LRU links within the slot's partition
    next: np.ndarray  # int32 (capacity,)
    partition: np.ndarray  # int32 (capacity,)

    @classmethod
    def empty(cls, capacity: int, history_length: int) -> Columns:
        """Zeroed arrays for `capacity` slots. Large zeroed arrays are calloc'ed, so memory is
        taken only as slots are used: a slot's fields are set when it is first used.
        """
        return cls(
            ints=np.zeros((capacity, INT_SLOTS), dtype=np.int64),
            floats=np.zeros((capacity, FLOAT_SLOTS), dtype=np.float64),
            history=np.zeros((capacity, 2 * history_length), dtype=np.int32),
            history_len=np.zeros(capacity, dtype=np.int32),
            items=np.zeros((capacity, MAX_SESSION_ITEMS), dtype=np.int32),
            items_len=np.zeros(capacity, dtype=np.int32),
            seen_hash=np.zeros((capacity, KINDS, MAX_SEEN), dtype=np.uint32),
            seen_time=np.zeros((capacity, KINDS, MAX_SEEN), dtype=np.int64),
            seen_len=np.zeros((capacity, KINDS), dtype=np.int32),
            pending=np.zeros(capacity, dtype=np.bool_),
            changed=np.zeros(capacity, dtype=np.bool_),
            prev=np.zeros(capacity, dtype=np.int32),  # set when the slot is first linked
            next=np.zeros(capacity, dtype=np.int32),
            partition=np.zeros(capacity, dtype=np.int32),
        )

    def grown(self, capacity: int) -> Columns:
        """A copy with room for `capacity` slots (its new slots zeroed, as `empty`'s)."""
        bigger = Columns.empty(capacity, self.history.shape[1] // 2)
        used = len(self.ints)
        for name in self.__dataclass_fields__:
            getattr(bigger, name)[:used] = getattr(self, name)
        return bigger

    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(getattr(self, name).nbytes for name in self.__dataclass_fields__)


class UserTable:
    """User states of the assigned partitions, as columns, with the store's interface.

    Every user updated or evicted since the last `take_changes` is a pending changelog
    record. Eviction: users idle for `ttl_s` of event time (against the newest event of their
    partition) and, above `max_users`, the least recently updated users of the largest
    partition (the first such partition in first-seen order on a tie).
    """

    def __init__(
        self,
        history_length: int,
        max_users: int = 2**62,
        ttl_s: float = float("inf"),
        capacity: int = 1024,
    ) -> None:
        """An empty table; `history_length` bounds each user's recent item sequence. Size
        `capacity` for the users a process holds (max_users plus a batch): it grows by
        doubling past that, which copies the columns once.
        """
        self.history_length = history_length
        self.max_users = max_users
        self._ttl_ms = ttl_s * 1000.0
        self.columns = Columns.empty(max(capacity, 2), history_length)
        self._keys: list[bytes | None] = [None] * len(self.columns.ints)
        self._unused = SCRATCH + 1  # slots from here on were never used
        self._free: list[int] = []  # slots released since
        # partition -> key -> slot; its order is the order partitions were first seen.
        self._index: dict[int, dict[bytes, int]] = {}
        self._ends = np.full((0, 2), NO_SLOT, dtype=np.int32)  # per partition: LRU head, tail
        self._watermark = np.zeros(0, dtype=np.int64)
        self._changed: list[int] = []  # slots whose `changed` flag was raised, maybe twice
        self._tombstones: dict[int, list[bytes]] = {}
        self._count = 0
        self.evicted = 0

    # -- slots --------------------------------------------------------------------------------

    def slots(self, partitions: np.ndarray, keys: list[bytes]) -> np.ndarray:
        """The slot of each (partition, key), allocating a pending one for a new user."""
        out = np.empty(len(keys), dtype=np.int64)
        index = self._index
        # One dict lookup per event: the keys are the bytes objects the consumer already
        # returned, so this is the only per-event Python of the features stage.
        for row, (partition, key) in enumerate(zip(partitions.tolist(), keys, strict=True)):
            users = index.get(partition)
            if users is None:
                users = self._add_partition(partition)
            slot = users.get(key)
            if slot is None:
                slot = users[key] = self._allocate(partition, key)
                self.columns.pending[slot] = True
                self._count += 1
            out[row] = slot
        return out

    def _add_partition(self, partition: int) -> dict[bytes, int]:
        if partition >= len(self._ends):
            size = max(partition + 1, 2 * len(self._ends))
            ends = np.full((size, 2), NO_SLOT, dtype=np.int32)
            ends[: len(self._ends)] = self._ends
            watermark = np.full(size, NEVER, dtype=np.int64)
            watermark[: len(self._watermark)] = self._watermark
            self._ends, self._watermark = ends, watermark
        self._ends[partition] = NO_SLOT
        self._watermark[partition] = NEVER
        users = self._index[partition] = {}
        return users

    def _allocate(self, partition: int, key: bytes) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            if self._unused == len(self._keys):
                old = len(self._keys)
                self.columns = self.columns.grown(2 * old)
                self._keys.extend([None] * old)
            slot = self._unused
            self._unused += 1
        self._keys[slot] = key
        self.columns.partition[slot] = partition
        return slot

    def _release(self, slots: np.ndarray, tombstones: bool) -> None:
        """Forget the users in `slots` (already unlinked by a kernel)."""
        keys, index = self._keys, self._index
        for slot in slots.tolist():
            key = keys[slot]
            assert key is not None
            partition = int(self.columns.partition[slot])
            del index[partition][key]
            if tombstones:
                self._tombstones.setdefault(partition, []).append(key)
            keys[slot] = None
            self._free.append(slot)
        self._count -= len(slots)

    # -- the store's interface ----------------------------------------------------------------

    def mark_changed(self, slots: np.ndarray) -> None:
        """Remember the slots a kernel newly flagged changed (`fold` returns them)."""
        self._changed.extend(slots.tolist())

    def evict(self) -> None:
        """Drop idle users past the TTL, then the least recent above `max_users`."""
        order = np.fromiter(self._index, dtype=np.int64, count=len(self._index))
        counts = np.fromiter(
            (len(users) for users in self._index.values()), dtype=np.int64, count=len(order)
        )
        c = self.columns
        evicted = _evict(
            order, counts, self._ttl_ms, float(self.max_users), c.ints, c.changed, c.prev,
            c.next, self._ends, self._watermark,
        )  # fmt: skip
        if len(evicted):
            self.evicted += len(evicted)
            self._release(evicted, tombstones=True)

    def take_changes(self) -> list[StateChange]:
        """Pending changelog records of every partition: state bytes or a tombstone."""
        changes: list[StateChange] = []
        for partition, keys in self._tombstones.items():
            users = self._index.get(partition, {})
            changes.extend(StateChange(partition, key, None) for key in keys if key not in users)
        self._tombstones.clear()
        if self._changed:
            slots = np.asarray(self._changed, dtype=np.int64)
            self._changed.clear()
            c = self.columns
            slots = slots[c.changed[slots]]  # a slot flagged twice, or since freed
            slots = np.unique(slots)
            c.changed[slots] = False
            buffer, starts = self.encode(slots)
            data = buffer.tobytes()
            bounds = starts.tolist()
            partitions = c.partition[slots].tolist()
            for i, slot in enumerate(slots.tolist()):
                key = self._keys[slot]
                assert key is not None
                changes.append(StateChange(partitions[i], key, data[bounds[i] : bounds[i + 1]]))
        return changes

    def encode(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The changelog bytes of `slots`, joined, and their offsets (len + 1)."""
        c = self.columns
        sizes = (
            HEADER_BYTES
            + 4 * c.history_len[slots].astype(np.int64)
            + 4 * c.items_len[slots].astype(np.int64)
            + 16 * c.seen_len[slots].sum(axis=1, dtype=np.int64)
        )
        starts = np.zeros(len(slots) + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        buffer = np.empty(int(starts[-1]), dtype=np.uint8)
        _encode(
            slots, starts, buffer, c.ints, c.floats, c.history, c.history_len, c.items,
            c.items_len, c.seen_hash, c.seen_time, c.seen_len,
        )  # fmt: skip
        return buffer, starts

    def restore(self, partitions: list[int], keys: list[bytes], values: list[bytes | None]) -> None:
        """Apply changelog records in order (None deletes); later records win."""
        # The one Python loop of a restore (the index is a dict): per record, its slot to
        # set, or -(slot + 1) to delete. Records come in runs of one partition.
        ops: list[int] = []
        deleted: list[int] = []
        index, allocate, append = self._index, self._allocate, ops.append
        current, users = -1, {}
        for partition, key, value in zip(partitions, keys, values, strict=True):
            if partition != current:
                current = partition
                found = index.get(partition)
                users = self._add_partition(partition) if found is None else found
            slot = users.get(key)
            if value is None:
                append(NO_SLOT if slot is None else -(slot + 1))
                if slot is not None:
                    del users[key]
                    self._keys[slot] = None
                    deleted.append(slot)
            elif slot is None:
                slot = users[key] = allocate(partition, key)
                self._count += 1
                append(slot)
            else:
                append(slot)
        buffer = np.frombuffer(b"".join(v for v in values if v is not None), dtype=np.uint8)
        lengths = np.fromiter((len(v) for v in values if v is not None), dtype=np.int64)
        starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        c = self.columns
        bad = _restore(
            np.array(ops, dtype=np.int64), buffer, starts, c.ints, c.floats, c.history,
            c.history_len, c.items, c.items_len, c.seen_hash, c.seen_time, c.seen_len,
            c.pending, c.changed, c.prev, c.next, c.partition, self._ends,
        )  # fmt: skip
        self._free.extend(deleted)  # only now: a slot must not be reused within the batch
        self._count -= len(deleted)
        if bad >= 0:
            raise ValueError(f"changelog record {bad} of the batch is not a user state")

    def drop_partition(self, partition: int) -> None:
        """Forget the state of a partition this process no longer owns."""
        users = self._index.get(partition)
        if users is None:
            return
        c = self.columns
        slots = np.fromiter(users.values(), dtype=np.int64, count=len(users))
        c.changed[slots] = False
        c.pending[slots] = False
        c.prev[slots] = c.next[slots] = NO_SLOT
        self._release(slots, tombstones=False)
        del self._index[partition]
        self._tombstones.pop(partition, None)
        self._ends[partition] = NO_SLOT
        self._watermark[partition] = NEVER

    def slot_of(self, partition: int, key: bytes) -> int:
        """The slot of a held user, or NO_SLOT."""
        return self._index.get(partition, {}).get(key, NO_SLOT)

    def partitions(self) -> list[int]:
        """Partitions with state here."""
        return list(self._index)

    def users(self) -> int:
        """Users held across all partitions."""
        return self._count

    def estimate_bytes(self) -> int:
        """Bytes held by user states: the slots used so far, plus each key and its index
        entry (about 100 bytes of dict and bytes object overhead).
        """
        slot = self.columns.nbytes() // len(self._keys)
        return slot * self._unused + sum(len(k) + 100 for k in self._keys if k is not None)

    def recency(self, partition: int) -> list[bytes]:
        """The partition's keys, least recently updated first (tests)."""
        out: list[bytes] = []
        slot = int(self._ends[partition, 0]) if partition in self._index else NO_SLOT
        while slot != NO_SLOT:
            key = self._keys[slot]
            assert key is not None
            out.append(key)
            slot = int(self.columns.next[slot])
        return out

    @property
    def ends(self) -> np.ndarray:
        """Per partition: LRU head and tail slots."""
        return self._ends

    @property
    def watermarks(self) -> np.ndarray:
        """Per partition: the newest event time."""
        return self._watermark


# --- kernels --------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _unlink(slot: int, prev: np.ndarray, nxt: np.ndarray, ends: np.ndarray, p: int) -> None:
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


@njit(cache=True, nogil=True)
def _append(slot: int, prev: np.ndarray, nxt: np.ndarray, ends: np.ndarray, p: int) -> None:
    tail = ends[p, 1]
    prev[slot] = tail
    nxt[slot] = NO_SLOT
    if tail == NO_SLOT:
        ends[p, 0] = slot
    else:
        nxt[tail] = slot
    ends[p, 1] = slot


@njit(cache=True, nogil=True)
def _linked(slot: int, prev: np.ndarray, ends: np.ndarray, p: int) -> bool:
    return bool(prev[slot] != NO_SLOT or ends[p, 0] == slot)


@njit(cache=True, nogil=True)
def _touch(
    slot: int,
    now_ms: int,
    ints: np.ndarray,
    floats: np.ndarray,
    history_len: np.ndarray,
    items_len: np.ndarray,
    seen_len: np.ndarray,
    pending: np.ndarray,
    changed: np.ndarray,
    prev: np.ndarray,
    nxt: np.ndarray,
    partition: np.ndarray,
    ends: np.ndarray,
    watermark: np.ndarray,
) -> bool:
    """`FeatureStore.get` without the return; True when the slot was newly flagged changed."""
    p = partition[slot]
    if pending[slot]:
        pending[slot] = False
        ints[slot, :] = NEVER
        ints[slot, 0] = ints[slot, 4] = ints[slot, 6] = (
            now_ms  # FIRST_SEEN, SESSION_START, COUNTER_TIME
        )
        ints[slot, 8] = ints[slot, 9] = 0  # SESSION_EVENTS, SESSION_VIEWS
        floats[slot, :] = 0.0
        history_len[slot] = items_len[slot] = 0
        seen_len[slot, :] = 0
    elif _linked(slot, prev, ends, p):
        _unlink(slot, prev, nxt, ends, p)
    _append(slot, prev, nxt, ends, p)
    if now_ms > watermark[p]:
        watermark[p] = now_ms
    if changed[slot]:
        return False
    changed[slot] = True
    return True


@njit(cache=True, nogil=True)
def _evict(
    order: np.ndarray,
    counts: np.ndarray,
    ttl_ms: float,
    max_users: float,
    ints: np.ndarray,
    changed: np.ndarray,
    prev: np.ndarray,
    nxt: np.ndarray,
    ends: np.ndarray,
    watermark: np.ndarray,
) -> np.ndarray:
    """Unlink the users to evict; their slots, in eviction order."""
    out = []
    for k in range(len(order)):
        p = order[k]
        horizon = watermark[p] - ttl_ms
        while ends[p, 0] != NO_SLOT and ints[ends[p, 0], LAST_TIME] < horizon:
            slot = ends[p, 0]
            _unlink(slot, prev, nxt, ends, p)
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
        _unlink(slot, prev, nxt, ends, p)
        changed[slot] = False
        counts[largest] -= 1
        total -= 1
        out.append(slot)
    result = np.empty(len(out), dtype=np.int64)
    for i in range(len(out)):
        result[i] = out[i]
    return result


@njit(cache=True, nogil=True, inline="always")
def _put(buffer: np.ndarray, at: int, value: int, width: int) -> int:
    for k in range(width):
        buffer[at + k] = (value >> (8 * k)) & 0xFF
    return at + width


@njit(cache=True, nogil=True, inline="always")
def _get(buffer: np.ndarray, at: int, width: int) -> int:
    value = 0
    for k in range(width):
        value |= int(np.int64(buffer[at + k]) << (8 * k))
    if width == 4 and value >= 2**31:
        value -= 2**32
    return value


@njit(cache=True, nogil=True)
def _encode(
    slots: np.ndarray,
    starts: np.ndarray,
    buffer: np.ndarray,
    ints: np.ndarray,
    floats: np.ndarray,
    history: np.ndarray,
    history_len: np.ndarray,
    items: np.ndarray,
    items_len: np.ndarray,
    seen_hash: np.ndarray,
    seen_time: np.ndarray,
    seen_len: np.ndarray,
) -> None:
    """`UserState.to_bytes` of each slot, at `starts`."""
    as_ints = floats.view(np.int64)  # a double's bytes, little-endian
    for i in range(len(slots)):
        s = slots[i]
        at = starts[i]
        buffer[at] = FORMAT_VERSION
        at += 1
        for k in range(INT_SLOTS):
            at = _put(buffer, at, ints[s, k], 8)
        for k in range(FLOAT_SLOTS):
            at = _put(buffer, at, as_ints[s, k], 8)
        at = _put(buffer, at, history_len[s], 2)
        at = _put(buffer, at, items_len[s], 2)
        for kind in range(KINDS):
            at = _put(buffer, at, 2 * seen_len[s, kind], 2)
        for k in range(history_len[s]):
            at = _put(buffer, at, history[s, k], 4)
        for k in range(items_len[s]):
            at = _put(buffer, at, items[s, k], 4)
        for kind in range(KINDS):
            for k in range(seen_len[s, kind]):
                at = _put(buffer, at, int(seen_hash[s, kind, k]), 8)
                at = _put(buffer, at, seen_time[s, kind, k], 8)


@njit(cache=True, nogil=True)
def _restore(
    ops: np.ndarray,
    buffer: np.ndarray,
    starts: np.ndarray,
    ints: np.ndarray,
    floats: np.ndarray,
    history: np.ndarray,
    history_len: np.ndarray,
    items: np.ndarray,
    items_len: np.ndarray,
    seen_hash: np.ndarray,
    seen_time: np.ndarray,
    seen_len: np.ndarray,
    pending: np.ndarray,
    changed: np.ndarray,
    prev: np.ndarray,
    nxt: np.ndarray,
    partition: np.ndarray,
    ends: np.ndarray,
) -> int:
    """Apply restore `ops` in order; -1, or the index of the first record that is not a
    user state (the rest is not applied).
    """
    as_ints = floats.view(np.int64)
    capacity = history.shape[1]
    value = 0
    for i in range(len(ops)):
        op = ops[i]
        if op == NO_SLOT:
            continue
        if op < 0:
            slot = -op - 1
            _unlink(slot, prev, nxt, ends, partition[slot])
            changed[slot] = pending[slot] = False
            continue
        slot = op
        at, end = starts[value], starts[value + 1]
        value += 1
        if end - at < HEADER_BYTES or buffer[at] != FORMAT_VERSION:
            return i
        at += 1
        for k in range(INT_SLOTS):
            ints[slot, k] = _get(buffer, at, 8)
            at += 8
        for k in range(FLOAT_SLOTS):
            as_ints[slot, k] = _get(buffer, at, 8)
            at += 8
        n_history = _get(buffer, at, 2)
        n_items = _get(buffer, at + 2, 2)
        n_seen = np.empty(KINDS, dtype=np.int64)
        total = 4 * (n_history + n_items)
        for kind in range(KINDS):
            n_seen[kind] = _get(buffer, at + 4 + 2 * kind, 2)
            total += 8 * n_seen[kind]
            if n_seen[kind] % 2 or n_seen[kind] > 2 * MAX_SEEN:
                return i
        at += 12
        if end - at != total or n_history % 2 or n_items > MAX_SESSION_ITEMS:
            return i
        skip = max(0, n_history - capacity)  # a longer history than this build keeps
        for k in range(n_history - skip):
            history[slot, k] = _get(buffer, at + 4 * (skip + k), 4)
        history_len[slot] = n_history - skip
        at += 4 * n_history
        for k in range(n_items):
            items[slot, k] = _get(buffer, at, 4)
            at += 4
        items_len[slot] = n_items
        for kind in range(KINDS):
            pairs = n_seen[kind] // 2
            for k in range(pairs):
                seen_hash[slot, kind, k] = _get(buffer, at, 8)
                seen_time[slot, kind, k] = _get(buffer, at + 8, 8)
                at += 16
            seen_len[slot, kind] = pairs
        pending[slot] = False
        p = partition[slot]
        if _linked(slot, prev, ends, p):
            _unlink(slot, prev, nxt, ends, p)
        _append(slot, prev, nxt, ends, p)
    return -1

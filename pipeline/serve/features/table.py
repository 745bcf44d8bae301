"""Per-user state as columns: one row (slot) per user in fixed-width arrays, with a key → slot
index per partition. This is the serving store; `state.FeatureStore` and `UserState` are its
readable reference, and the changelog bytes are the same (`UserState.to_bytes`), so a
changelog written by either restores into the other.

Each slot holds the int64 and float64 slots of `state` (times, counts, decayed counters,
affinities) and three variable-length parts: the recent (item, category) history, kept
oldest first, up to `2 * history_length` entries; the session's distinct items (up to
MAX_SESSION_ITEMS); and per seen kind (device, IP, country, card) up to MAX_SEEN (hash, last
seen) pairs in arrival order. The variable parts are two-tier, as a small-string
optimisation is: a slot has room inline for a few of each (INLINE_EVENTS events,
INLINE_ITEMS items, INLINE_SEEN values per kind), which is all that most users ever use, and
a user who outgrows any of them moves all three to a full-size row of the `Pool` (`big`
names it). A slot costs about 500 bytes and a pool row about 1.4 KB, against 1.7 KB for one
full-size slot per user (README, Performance). There is no Python object per user except the
key bytes and their entry in the index.

Least-recently-updated order, which eviction follows, is a doubly linked list through the
slots of each partition, as `FeatureStore`'s OrderedDicts are. Slot 0 is never a user's: it
is the scratch slot that scores a late event without changing its user.

Semantics that differ from the reference: a restored history longer than this build's
`2 * history_length` (the setting was lowered) keeps its newest entries.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from itertools import pairwise, repeat
from typing import NamedTuple, cast

import numpy as np
from numba import njit

from pipeline.serve.features.state import (
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
from pipeline.serve.kernel import inline_kernel, kernel

KINDS = len(SEEN_KINDS)
INLINE_EVENTS = 8  # history events a slot holds before its user moves to a pool row
INLINE_ITEMS = 8
INLINE_SEEN = 2  # values per seen kind
_HEADER = struct.Struct(f"<B{INT_SLOTS}q{FLOAT_SLOTS}d6H")
HEADER_BYTES = _HEADER.size
_COUNTS_BYTES = 12  # the header ends with its six uint16 counts (history, items, seen kinds)
NO_SLOT = -1
SCRATCH = 0


# The first byte of a changelog key that is not a user's: user ids are the keys of valid
# events, which equal the event's UTF-8 user_id, and 0xFF never occurs in UTF-8.
CONTROL = b"\xff"


@dataclass(slots=True)
class Columns:
    """The state arrays, slot-major. Kernels take them as arguments."""

    ints: np.ndarray  # int64 (capacity, INT_SLOTS)
    floats: np.ndarray  # float64 (capacity, FLOAT_SLOTS)
    history: np.ndarray  # int32 (capacity, inline history entries): item, category, ...
    history_len: np.ndarray  # int32 (capacity,): entries used (two per event)
    items: np.ndarray  # int32 (capacity, INLINE_ITEMS)
    items_len: np.ndarray  # int32 (capacity,)
    seen_hash: np.ndarray  # uint32 (capacity, KINDS, INLINE_SEEN): CRC-32 of the value
    seen_time: np.ndarray  # int64 (capacity, KINDS, INLINE_SEEN)
    seen_len: np.ndarray  # int32 (capacity, KINDS)
    big: np.ndarray  # int32 (capacity,): the slot's pool row + 1; 0 while inline
    pending: np.ndarray  # bool (capacity,): allocated, initialised by its first event
    changed: np.ndarray  # bool (capacity,): a changelog record is due
    prev: np.ndarray  # int32 (capacity,): LRU links within the slot's partition
    next: np.ndarray  # int32 (capacity,)
    partition: np.ndarray  # int32 (capacity,)

    @classmethod
    def empty(cls, capacity: int, history_width: int) -> Columns:
        """Zeroed arrays for `capacity` slots with `history_width` inline history entries.
        Large zeroed arrays are calloc'ed, so memory is taken only as slots are used: a
        slot's fields are set when it is first used.
        """
        return cls(
            ints=np.zeros((capacity, INT_SLOTS), dtype=np.int64),
            floats=np.zeros((capacity, FLOAT_SLOTS), dtype=np.float64),
            history=np.zeros((capacity, history_width), dtype=np.int32),
            history_len=np.zeros(capacity, dtype=np.int32),
            items=np.zeros((capacity, min(INLINE_ITEMS, MAX_SESSION_ITEMS)), dtype=np.int32),
            items_len=np.zeros(capacity, dtype=np.int32),
            seen_hash=np.zeros((capacity, KINDS, min(INLINE_SEEN, MAX_SEEN)), dtype=np.uint32),
            seen_time=np.zeros((capacity, KINDS, min(INLINE_SEEN, MAX_SEEN)), dtype=np.int64),
            seen_len=np.zeros((capacity, KINDS), dtype=np.int32),
            big=np.zeros(capacity, dtype=np.int32),
            pending=np.zeros(capacity, dtype=np.bool_),
            changed=np.zeros(capacity, dtype=np.bool_),
            prev=np.zeros(capacity, dtype=np.int32),  # set when the slot is first linked
            next=np.zeros(capacity, dtype=np.int32),
            partition=np.zeros(capacity, dtype=np.int32),
        )

    def grown(self, capacity: int) -> Columns:
        """A copy with room for `capacity` slots (its new slots zeroed, as `empty`'s)."""
        bigger = Columns.empty(capacity, self.history.shape[1])
        used = len(self.ints)
        for name in self.__dataclass_fields__:
            getattr(bigger, name)[:used] = getattr(self, name)
        return bigger

    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(getattr(self, name).nbytes for name in self.__dataclass_fields__)


@dataclass(slots=True)
class Pool:
    """Full-size rows for the variable parts of users who outgrew their slot's inline room.
    Row 0 belongs to the scratch slot; the free rows are a stack, `free[:top[0]]`, which
    kernels pop (`promote`), so `reserve` must leave enough before each kernel.
    """

    history: np.ndarray  # int32 (rows, 2 * history_length)
    items: np.ndarray  # int32 (rows, MAX_SESSION_ITEMS)
    seen_hash: np.ndarray  # uint32 (rows, KINDS, MAX_SEEN)
    seen_time: np.ndarray  # int64 (rows, KINDS, MAX_SEEN)
    free: np.ndarray  # int32 (rows,): free rows, the next one to take last
    top: np.ndarray  # int64 (1,): how many of `free` are free

    @classmethod
    def empty(cls, rows: int, history_length: int) -> Pool:
        """`rows` zeroed rows (calloc'ed, as the slots), all but row 0 free."""
        return cls(
            history=np.zeros((rows, 2 * history_length), dtype=np.int32),
            items=np.zeros((rows, MAX_SESSION_ITEMS), dtype=np.int32),
            seen_hash=np.zeros((rows, KINDS, MAX_SEEN), dtype=np.uint32),
            seen_time=np.zeros((rows, KINDS, MAX_SEEN), dtype=np.int64),
            free=np.arange(rows - 1, -1, -1, dtype=np.int32),
            top=np.array([rows - 1], dtype=np.int64),
        )

    def reserve(self, rows: int) -> None:
        """Make sure `rows` rows are free, doubling the pool when they are not."""
        free = int(self.top[0])
        if free >= rows:
            return
        old = len(self.free)
        size = max(2 * old, old + rows - free)
        for name in ("history", "items", "seen_hash", "seen_time"):
            array = getattr(self, name)
            grown = np.zeros((size, *array.shape[1:]), dtype=array.dtype)
            grown[:old] = array
            setattr(self, name, grown)
        stack = np.empty(size, dtype=np.int32)
        stack[:free] = self.free[:free]
        stack[free : free + size - old] = np.arange(size - 1, old - 1, -1, dtype=np.int32)
        self.free = stack
        self.top[0] = free + size - old

    def release(self, rows: np.ndarray) -> None:
        """Return `rows` to the free stack."""
        top = int(self.top[0])
        self.free[top : top + len(rows)] = rows
        self.top[0] = top + len(rows)

    def used(self) -> int:
        """Rows in use (the scratch slot's included)."""
        return len(self.free) - int(self.top[0])

    def row_bytes(self) -> int:
        """Bytes of one row."""
        arrays = (self.history, self.items, self.seen_hash, self.seen_time, self.free)
        return sum(a.nbytes // len(a) for a in arrays)


class Var(NamedTuple):
    """The variable parts of every slot, inline and pooled, as kernels take them (numba
    reads a NamedTuple's fields as typed arguments).
    """

    history: np.ndarray
    items: np.ndarray
    seen_hash: np.ndarray
    seen_time: np.ndarray
    big: np.ndarray
    pool_history: np.ndarray
    pool_items: np.ndarray
    pool_hash: np.ndarray
    pool_time: np.ndarray
    free: np.ndarray
    top: np.ndarray


class PartitionState(NamedTuple):
    """A partition's users as changelog values, least recently updated first, with its
    latest control records: what `UserTable.export` gives and `UserTable.load` takes.
    """

    keys: list[bytes]
    values: np.ndarray  # uint8: the values joined
    starts: np.ndarray  # int64 (users + 1): value i is values[starts[i]:starts[i + 1]]
    controls: dict[bytes, bytes]


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
        width = 2 * min(INLINE_EVENTS, history_length)
        self.columns = Columns.empty(max(capacity, 2), width)
        self.pool = Pool.empty(1024, history_length)
        self.columns.big[SCRATCH] = 1  # the scratch slot always works in pool row 0
        self._keys: list[bytes | None] = [None] * len(self.columns.ints)
        self._unused = SCRATCH + 1  # slots from here on were never used
        self._free: list[int] = []  # slots released since
        # partition -> key -> slot; its order is the order partitions were first seen.
        self._index: dict[int, dict[bytes, int]] = {}
        self._ends = np.full((0, 2), NO_SLOT, dtype=np.int32)  # per partition: LRU head, tail
        self._watermark = np.zeros(0, dtype=np.int64)
        self._changed: list[int] = []  # slots whose `changed` flag was raised, maybe twice
        self._tombstones: dict[int, list[bytes]] = {}
        # Non-user changelog records, e.g. the forget position: (partition, key) -> value.
        self._controls: dict[tuple[int, bytes], bytes] = {}
        # The latest value of each control record, written or restored: a partition's
        # export carries them, as its changelog does.
        self._latest_controls: dict[tuple[int, bytes], bytes] = {}
        self._count = 0
        self._key_bytes = 0  # of the keys held: kept as they come and go, never summed
        self.evicted = 0

    # -- slots --------------------------------------------------------------------------------

    def slots(self, partitions: np.ndarray, keys: list[bytes]) -> np.ndarray:
        """The slot of each (partition, key), allocating a pending one for a new user."""
        out: list[int] = []
        append = out.append
        # One dict lookup per event: the keys are the bytes objects the consumer already
        # returned, so this is the only per-event Python of the features stage. A batch
        # holds runs of one partition (the consumer returns each fetch's messages together),
        # so the partition's map is looked up once per run. (`map` over each partition's
        # keys, as `restore` does, measured slower at serving batch sizes: 12 partitions
        # of about 40 events each pay more in numpy calls than the loop costs.)
        current, users = -1, {}
        for partition, key in zip(partitions.tolist(), keys, strict=True):
            if partition != current:
                current = partition
                users = self._users(partition)
            slot = users.get(key)
            if slot is None:
                slot = self._allocate(partition, key)
                self.columns.pending[slot] = True
            append(slot)
        return np.array(out, dtype=np.int64)

    def _users(self, partition: int) -> dict[bytes, int]:
        """The partition's key → slot map, made on first use."""
        users = self._index.get(partition)
        return self._add_partition(partition) if users is None else users

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
        """A slot for `key`, a new user of `partition`, entered in its index."""
        if self._free:
            slot = self._free.pop()
        else:
            self._room(1)
            slot = self._unused
            self._unused += 1
        self._keys[slot] = key
        self._key_bytes += len(key)
        self._index[partition][key] = slot
        self.columns.partition[slot] = partition
        self._count += 1
        return slot

    def _allocate_all(self, partition: int, keys: list[bytes]) -> np.ndarray:
        """`_allocate` for many keys at once (a restore's)."""
        reused = min(len(keys), len(self._free))
        slots = self._free[len(self._free) - reused :]
        del self._free[len(self._free) - reused :]
        fresh = len(keys) - reused
        self._room(fresh)
        for slot, key in zip(slots, keys, strict=False):
            self._keys[slot] = key
        self._keys[self._unused : self._unused + fresh] = keys[reused:]
        slots.extend(range(self._unused, self._unused + fresh))
        self._unused += fresh
        self._count += len(keys)
        self._key_bytes += sum(map(len, keys))
        self._index[partition].update(zip(keys, slots, strict=True))
        out = np.array(slots, dtype=np.int64)
        self.columns.partition[out] = partition
        return out

    def _room(self, fresh: int) -> None:
        """Grow the columns, by doubling, until `fresh` never-used slots are left."""
        while self._unused + fresh > len(self._keys):
            old = len(self._keys)
            self.columns = self.columns.grown(2 * old)
            self._keys.extend([None] * old)

    def var(self) -> Var:
        """The variable parts, for a kernel (after `pool.reserve` when it may promote)."""
        c, p = self.columns, self.pool
        return Var(
            c.history, c.items, c.seen_hash, c.seen_time, c.big, p.history, p.items,
            p.seen_hash, p.seen_time, p.free, p.top,
        )  # fmt: skip

    def _unpool(self, slots: np.ndarray) -> None:
        """Return the pool rows of `slots` (users gone) and mark the slots inline."""
        big = self.columns.big[slots]
        self.pool.release(big[big > 0] - 1)
        self.columns.big[slots] = 0

    def _release(self, slots: np.ndarray, tombstones: bool) -> None:
        """Forget the users in `slots` (already unlinked by a kernel)."""
        self._unpool(slots)
        keys, index = self._keys, self._index
        for slot in slots.tolist():
            key = keys[slot]
            assert key is not None
            partition = int(self.columns.partition[slot])
            del index[partition][key]
            if tombstones:
                self._tombstones.setdefault(partition, []).append(key)
            keys[slot] = None
            self._key_bytes -= len(key)
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

    def forget(self, partition: int, key: bytes) -> bool:
        """Drop a user at once, with a tombstone for the changelog (an erasure request);
        False when the partition holds no such user.
        """
        slot = self.slot_of(partition, key)
        if slot == NO_SLOT:
            return False
        c = self.columns
        if _linked(slot, c.prev, self._ends, partition):
            _unlink(slot, c.prev, c.next, self._ends, partition)
        c.changed[slot] = c.pending[slot] = False
        self._release(np.array([slot], dtype=np.int64), tombstones=True)
        return True

    def put_control(self, partition: int, key: bytes, value: bytes) -> None:
        """Write a non-user record (its key starts with CONTROL) to the partition's
        changelog with the next changes; a restore returns it instead of loading it.
        """
        assert key.startswith(CONTROL), key
        self._controls[partition, key] = value
        self._latest_controls[partition, key] = value

    def keep_controls(self, controls: dict[tuple[int, bytes], bytes]) -> None:
        """Remember control records a restore read ((partition, key) -> value)."""
        self._latest_controls.update(controls)

    def take_changes(self) -> list[StateChange]:
        """Pending changelog records of every partition: state bytes or a tombstone, then
        the control records.
        """
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
            held = self._keys
            changes.extend(
                map(
                    StateChange,
                    c.partition[slots].tolist(),
                    [held[slot] for slot in slots.tolist()],
                    [data[a:b] for a, b in pairwise(bounds)],
                )
            )
        changes.extend(StateChange(p, key, value) for (p, key), value in self._controls.items())
        self._controls.clear()
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
            slots, starts, buffer, c.ints, c.floats, c.history_len, c.items_len, c.seen_len,
            self.var(),
        )  # fmt: skip
        return buffer, starts

    def expect(self, users: int) -> None:
        """Make room for `users` more users at once (a restore knows how many records it
        will read), so that the pool does not grow by doubling as they come, which copies
        it each time. Room untouched takes no memory, as the slots' does not.
        """
        self.pool.reserve(min(users, len(self._keys)))

    def restore(self, partitions: list[int], keys: list[bytes], values: list[bytes | None]) -> None:
        """Apply changelog records in order (None deletes); later records win. Raises
        ValueError, having applied none of them, when a value is not a user state.
        """
        # A changelog value is a user's whole state, so of each key's records in the batch
        # only the last one matters: applied in the order of those last records, they leave
        # the states and the recency order that a record-by-record replay would. Per record
        # there are a few comprehensions and `dict`/`map` calls, no Python step of its own;
        # the kernel checks every value.
        present = [value for value in values if value is not None]
        lengths = np.fromiter(map(len, present), dtype=np.int64, count=len(present))
        starts = np.zeros(len(present) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        buffer = np.frombuffer(b"".join(present), dtype=np.uint8)
        has_value = np.fromiter((v is not None for v in values), np.bool_, len(values))
        bad = _check(buffer, starts)
        if bad >= 0:
            record = int(np.flatnonzero(has_value)[bad])
            raise ValueError(f"changelog record {record} of the batch is not a user state")
        ops: list[np.ndarray] = []  # per applied record: its slot, or -(slot + 1) to delete
        applied: list[np.ndarray] = []  # per applied record: its index in the batch
        deleted: list[int] = []
        order, groups = _by_partition(np.asarray(partitions, dtype=np.int64))
        if order is not None:
            keys = list(map(keys.__getitem__, order.tolist()))
        for partition, first, end in groups:
            users = self._users(partition)
            last = dict(zip(keys[first:end], range(first, end), strict=True))
            run = list(last)
            at = np.fromiter(last.values(), dtype=np.int64, count=len(run))
            if order is not None:
                at = order[at]  # the record's index in the batch
            put = has_value[at]
            slots = np.fromiter(map(users.get, run, repeat(NO_SLOT)), np.int64, len(run))
            new = np.flatnonzero(put & (slots == NO_SLOT))
            if len(new):
                slots[new] = self._allocate_all(partition, [run[j] for j in new.tolist()])
            gone = np.flatnonzero(~put & (slots != NO_SLOT))
            for j in gone.tolist():  # leaves the index now, frees its slot after the batch
                del users[run[j]]
                self._keys[slots[j]] = None
                self._key_bytes -= len(run[j])
            deleted.extend(slots[gone].tolist())
            keep = slots != NO_SLOT  # a tombstone of an unknown user changes nothing
            kept = at[keep]
            sequence = np.argsort(kept)  # the order of the last records
            ops.append(np.where(put, slots, -(slots + 1))[keep][sequence])
            applied.append(kept[sequence])
        if not ops:
            return
        op = np.concatenate(ops)
        which = (np.cumsum(has_value) - 1)[np.concatenate(applied)]  # its value's index
        c = self.columns
        self.pool.reserve(len(op))
        _restore(
            op, which, buffer, starts, self.history_length, c.ints, c.floats, c.history_len,
            c.items_len, c.seen_len, self.var(), c.pending, c.changed, c.prev, c.next,
            c.partition, self._ends, np.empty(KINDS, dtype=np.int64),
        )  # fmt: skip
        self._unpool(np.array(deleted, dtype=np.int64))
        self._free.extend(deleted)  # only now: a slot must not be reused within the batch
        self._count -= len(deleted)

    def export(self, partition: int) -> PartitionState | None:
        """The partition's users, least recently updated first, as its changelog would
        restore them; None while it has changelog records pending (`take_changes`), since
        then the export would hold state that its changelog does not.
        """
        if self._tombstones.get(partition) or any(p == partition for p, _ in self._controls):
            return None
        users = self._index.get(partition, {})
        slots = np.empty(len(users), dtype=np.int64)
        head = int(self._ends[partition, 0]) if users else NO_SLOT
        if _chain(head, self.columns.next, slots) != len(users):
            return None  # a user allocated but not yet folded in (not linked yet)
        if self.columns.changed[slots].any():
            return None
        values, starts = self.encode(slots)
        keys = self._keys
        controls = {k: v for (p, k), v in self._latest_controls.items() if p == partition}
        held = cast(list[bytes], [keys[slot] for slot in slots.tolist()])  # every one is held
        return PartitionState(held, values, starts, controls)

    def load(self, partition: int, state: PartitionState) -> None:
        """Take an export of `partition`, which holds no users here yet. Raises ValueError,
        having loaded nothing, when a value is not a user state or a key repeats.
        """
        users = self._users(partition)
        if users:
            raise ValueError(f"partition {partition} already holds {len(users)} users")
        if _check(state.values, state.starts) >= 0 or len(set(state.keys)) != len(state.keys):
            raise ValueError(f"partition {partition}'s export is not a set of user states")
        slots = self._allocate_all(partition, state.keys)
        c = self.columns
        self.pool.reserve(len(slots))
        _restore(
            slots, np.arange(len(slots)), state.values, state.starts, self.history_length,
            c.ints, c.floats, c.history_len, c.items_len, c.seen_len, self.var(), c.pending,
            c.changed, c.prev, c.next, c.partition, self._ends, np.empty(KINDS, dtype=np.int64),
        )  # fmt: skip
        self._latest_controls.update(((partition, k), v) for k, v in state.controls.items())

    def drop_partition(self, partition: int) -> None:
        """Forget the state of a partition this process no longer owns."""
        for controls in (self._controls, self._latest_controls):
            for where in [where for where in controls if where[0] == partition]:
                del controls[where]
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
        """Bytes held by user states: the slots used so far, the pool rows in use, plus
        each key and its index entry (about 100 bytes of dict and bytes object overhead).
        Constant time: the loop samples it, and summing the keys walked every slot (44 ms
        a sample with room for a million users, the loop stalled meanwhile).
        """
        slot = self.columns.nbytes() // len(self._keys)
        pooled = self.pool.row_bytes() * self.pool.used()
        return slot * self._unused + pooled + self._key_bytes + 100 * self._count

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


def _by_partition(partitions: np.ndarray) -> tuple[np.ndarray | None, list[tuple[int, int, int]]]:
    """A batch's rows grouped by partition, in their order within each: the order (None
    when they already are, as a fetch's runs usually are) and each group's (partition,
    first, end) in it. Partitions are independent, so a group's rows may go in one pass.
    """
    heads = partitions[np.flatnonzero(np.diff(partitions, prepend=-1))]  # each run's
    if len(np.unique(heads)) == len(heads):
        return None, _runs(partitions)
    order = np.argsort(partitions, kind="stable")
    return order, _runs(partitions[order])


def _runs(partitions: np.ndarray) -> list[tuple[int, int, int]]:
    """(partition, first, end) of each run of one partition."""
    cuts = np.flatnonzero(partitions[1:] != partitions[:-1]) + 1
    bounds = [0, *cuts.tolist(), len(partitions)]
    return [(int(partitions[a]), a, b) for a, b in pairwise(bounds) if b > a]


# --- kernels --------------------------------------------------------------------------------


@kernel
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


@kernel
def _append(slot: int, prev: np.ndarray, nxt: np.ndarray, ends: np.ndarray, p: int) -> None:
    tail = ends[p, 1]
    prev[slot] = tail
    nxt[slot] = NO_SLOT
    if tail == NO_SLOT:
        ends[p, 0] = slot
    else:
        nxt[tail] = slot
    ends[p, 1] = slot


@kernel
def _linked(slot: int, prev: np.ndarray, ends: np.ndarray, p: int) -> bool:
    return bool(prev[slot] != NO_SLOT or ends[p, 0] == slot)


@kernel
def _chain(head: int, nxt: np.ndarray, out: np.ndarray) -> int:
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


@inline_kernel
def history_of(s: int, v: Var) -> np.ndarray:
    """Slot `s`'s history entries: inline, or its pool row's."""
    b = v.big[s]
    found: np.ndarray = v.pool_history[b - 1] if b else v.history[s]
    return found


@inline_kernel
def items_of(s: int, v: Var) -> np.ndarray:
    """Slot `s`'s session items."""
    b = v.big[s]
    found: np.ndarray = v.pool_items[b - 1] if b else v.items[s]
    return found


@inline_kernel
def hashes_of(s: int, v: Var) -> np.ndarray:
    """Slot `s`'s seen hashes, (KINDS, room)."""
    b = v.big[s]
    found: np.ndarray = v.pool_hash[b - 1] if b else v.seen_hash[s]
    return found


@inline_kernel
def times_of(s: int, v: Var) -> np.ndarray:
    """Slot `s`'s seen times, (KINDS, room)."""
    b = v.big[s]
    found: np.ndarray = v.pool_time[b - 1] if b else v.seen_time[s]
    return found


@kernel
def promote(
    s: int, v: Var, history_len: np.ndarray, items_len: np.ndarray, seen_len: np.ndarray
) -> None:
    """Move slot `s`'s variable parts to a free pool row (one of them outgrew its room).
    The copies are clamped to the inline room: a reused slot may still carry the lengths of
    its previous user until they are set.
    """
    if v.big[s]:
        return
    top = v.top[0]
    if top == 0:
        raise RuntimeError("user state pool exhausted: reserve rows before the kernel")
    row = v.free[top - 1]
    v.top[0] = top - 1
    v.big[s] = row + 1
    for k in range(min(history_len[s], v.history.shape[1])):
        v.pool_history[row, k] = v.history[s, k]
    for k in range(min(items_len[s], v.items.shape[1])):
        v.pool_items[row, k] = v.items[s, k]
    for kind in range(KINDS):
        for k in range(min(seen_len[s, kind], v.seen_hash.shape[2])):
            v.pool_hash[row, kind, k] = v.seen_hash[s, kind, k]
            v.pool_time[row, kind, k] = v.seen_time[s, kind, k]


@kernel
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


@inline_kernel
def _get(buffer: np.ndarray, at: int, width: int) -> int:
    value = 0
    for k in range(width):
        value |= int(np.int64(buffer[at + k]) << (8 * k))
    if width == 4 and value >= 2**31:
        value -= 2**32
    return value


@kernel
def _encode(
    slots: np.ndarray,
    starts: np.ndarray,
    buffer: np.ndarray,
    ints: np.ndarray,
    floats: np.ndarray,
    history_len: np.ndarray,
    items_len: np.ndarray,
    seen_len: np.ndarray,
    v: Var,
) -> None:
    """`UserState.to_bytes` of each slot, at `starts`. The parts are written through typed
    views of the output's bytes (unaligned, which numba and x86-64 and ARM64 allow): a
    value written a byte at a time cost about 1 ns a byte, 1.3 µs a full-history record.
    """
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
        counts = buffer[at : at + _COUNTS_BYTES].view(np.uint16)
        n_history, n_items = history_len[s], items_len[s]
        counts[0], counts[1] = n_history, n_items
        for kind in range(KINDS):
            counts[2 + kind] = 2 * seen_len[s, kind]
        at += _COUNTS_BYTES
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


@kernel
def _check(buffer: np.ndarray, starts: np.ndarray) -> int:
    """-1 when every value is a user state this build reads, else the first one's index."""
    for j in range(len(starts) - 1):
        at, end = starts[j], starts[j + 1]
        if end - at < HEADER_BYTES or buffer[at] != FORMAT_VERSION:
            return j
        at += HEADER_BYTES - _COUNTS_BYTES
        n_history = _get(buffer, at, 2)
        n_items = _get(buffer, at + 2, 2)
        total = 4 * (n_history + n_items)
        for kind in range(KINDS):
            n_seen = _get(buffer, at + 4 + 2 * kind, 2)
            total += 8 * n_seen
            if n_seen % 2 or n_seen > 2 * MAX_SEEN:
                return j
        if end - at - _COUNTS_BYTES != total or n_history % 2 or n_items > MAX_SESSION_ITEMS:
            return j
    return -1


@kernel
def _restore(
    ops: np.ndarray,
    which: np.ndarray,
    buffer: np.ndarray,
    starts: np.ndarray,
    history_length: int,
    ints: np.ndarray,
    floats: np.ndarray,
    history_len: np.ndarray,
    items_len: np.ndarray,
    seen_len: np.ndarray,
    v: Var,
    pending: np.ndarray,
    changed: np.ndarray,
    prev: np.ndarray,
    nxt: np.ndarray,
    partition: np.ndarray,
    ends: np.ndarray,
    n_seen: np.ndarray,
) -> None:
    """Apply restore `ops` in order, a put taking the state in value `which[i]` (values
    `_check` passed); `n_seen` (KINDS) is its working space.
    """
    capacity = 2 * history_length
    for i in range(len(ops)):
        op = ops[i]
        if op < 0:
            slot = -op - 1
            _unlink(slot, prev, nxt, ends, partition[slot])
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
        counts = buffer[at : at + _COUNTS_BYTES].view(np.uint16)
        n_history, n_items = int(counts[0]), int(counts[1])
        most_seen = 0
        for kind in range(KINDS):
            n_seen[kind] = counts[2 + kind]
            most_seen = max(most_seen, n_seen[kind])
        at += _COUNTS_BYTES
        skip = max(0, n_history - capacity)  # a longer history than this build keeps
        fits = (
            n_history - skip <= v.history.shape[1]
            and n_items <= v.items.shape[1]
            and most_seen // 2 <= v.seen_hash.shape[2]
        )
        if not fits:
            promote(slot, v, history_len, items_len, seen_len)
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
        if _linked(slot, prev, ends, p):
            _unlink(slot, prev, nxt, ends, p)
        _append(slot, prev, nxt, ends, p)

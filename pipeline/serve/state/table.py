"""Per-user state as columns: one row (slot) per user in fixed-width arrays, with a
(partition, key) → slot index (`keys.KeyIndex`). This is the serving store;
`state.FeatureStore` and `UserState` are its readable reference, and the changelog bytes are
the same (`UserState.to_bytes`), so a changelog written by either restores into the other.

Each slot holds the int64 and float64 slots of `state` (times, counts, decayed counters,
affinities) and three variable-length parts: the recent (item, category) history, kept
oldest first, up to `2 * history_length` entries; the session's distinct items (up to
MAX_SESSION_ITEMS); and per seen kind (device, IP, country, card) up to MAX_SEEN (hash, last
seen) pairs in arrival order. The variable parts are two-tier, as a small-string
optimisation is: a slot has room inline for a few of each (INLINE_EVENTS events,
INLINE_ITEMS items, INLINE_SEEN values per kind), which is all that most users ever use, and
a user who outgrows any of them moves all three to a full-size row of the `Pool` (`big`
names it). A slot costs about 530 bytes and a pool row about 1.4 KB, against 1.7 KB for one
full-size slot per user (README, Performance). There is no Python object per user: the keys
are bytes in the index's arena.

Least-recently-updated order, which eviction follows, is a doubly linked list through the
slots of each partition, as `FeatureStore`'s OrderedDicts are. Slot 0 is never a user's: it
is the scratch slot that scores a late event without changing its user.

Semantics that differ from the reference: a restored history longer than this build's
`2 * history_length` (the setting was lowered) keeps its newest entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import numpy as np
from numba import njit

from pipeline.serve.kernel import inline_kernel, kernel
from pipeline.serve.state.changes import StateChange, StateChanges
from pipeline.serve.state.keys import FREE, KeyIndex, find_or_add, lookup, remove, spans
from pipeline.serve.state.layout import INLINE_EVENTS, KINDS, Columns
from pipeline.serve.state.reference import (
    COUNTER_TIME,
    FIRST_SEEN,
    FLOAT_SLOTS,
    FORMAT_VERSION,
    HEADER,
    INT_SLOTS,
    LAST_TIME,
    MAX_SEEN,
    MAX_SESSION_ITEMS,
    NEVER,
    SESSION_EVENTS,
    SESSION_START,
    SESSION_VIEWS,
)

HEADER_BYTES = HEADER.size
_COUNTS_BYTES = 12  # the header ends with its six uint16 counts (history, items, seen kinds)
NO_SLOT = -1
SCRATCH = 0


# The first byte of a changelog key that is not a user's: user ids are the keys of valid
# events, which equal the event's UTF-8 user_id, and 0xFF never occurs in UTF-8.
CONTROL = b"\xff"


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

    key_bytes: np.ndarray  # uint8: the keys joined
    key_starts: np.ndarray  # int64 (users + 1): key i is key_bytes[key_starts[i]:...[i + 1]]
    values: np.ndarray  # uint8: the values joined
    starts: np.ndarray  # int64 (users + 1): value i is values[starts[i]:starts[i + 1]]
    controls: dict[bytes, bytes]

    @property
    def users(self) -> int:
        """How many users it holds."""
        return len(self.starts) - 1

    def keys(self) -> list[bytes]:
        """The keys, as bytes (tests, and the rare reader that needs objects)."""
        blob, bounds = self.key_bytes.tobytes(), self.key_starts.tolist()
        return [blob[a:b] for a, b in pairwise(bounds)]


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
        self._index = KeyIndex(len(self.columns.ints), SCRATCH + 1)
        # Partitions with state here, in the order first seen (eviction's tie-break).
        self._partitions: dict[int, None] = {}
        self._known = np.zeros(0, dtype=np.bool_)  # per partition: in `_partitions`
        self._ends = np.full((0, 2), NO_SLOT, dtype=np.int32)  # per partition: LRU head, tail
        self._watermark = np.zeros(0, dtype=np.int64)
        self._changed: list[int] = []  # slots whose `changed` flag was raised, maybe twice
        self._tombstones: dict[int, list[bytes]] = {}
        # Non-user changelog records, e.g. the forget position: (partition, key) -> value.
        self._controls: dict[tuple[int, bytes], bytes] = {}
        # The latest value of each control record, written or restored: a partition's
        # export carries them, as its changelog does.
        self._latest_controls: dict[tuple[int, bytes], bytes] = {}
        self.evicted = 0

    # -- slots --------------------------------------------------------------------------------

    def slots(self, partitions: np.ndarray, keys: list[bytes]) -> np.ndarray:
        """The slot of each (partition, key), allocating a pending one for a new user."""
        return self.slots_in(partitions, *spans(keys))

    def slots_in(
        self, partitions: np.ndarray, buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray
    ) -> np.ndarray:
        """`slots` of the keys at `buffer[starts[i]:starts[i] + lengths[i]]`: one kernel
        call for the batch, no Python object per key (`keys.KeyIndex`).
        """
        self._see(partitions)
        out = np.empty(len(partitions), dtype=np.int64)
        self._find_or_add(partitions, buffer, starts, lengths, out, pend=True)
        return out

    def _see(self, partitions: np.ndarray) -> None:
        """Add the partitions of `partitions` not seen yet, in the order they come there."""
        if not len(partitions):
            return
        known = self._known
        if int(partitions.max()) < len(known) and known[partitions].all():
            return
        distinct, first = np.unique(partitions, return_index=True)
        for partition in distinct[np.argsort(first)].tolist():
            if partition >= len(self._known) or not self._known[partition]:
                self._add_partition(partition)

    def _add_partition(self, partition: int) -> None:
        if partition >= len(self._ends):
            size = max(partition + 1, 2 * len(self._ends))
            ends = np.full((size, 2), NO_SLOT, dtype=np.int32)
            ends[: len(self._ends)] = self._ends
            watermark = np.full(size, NEVER, dtype=np.int64)
            watermark[: len(self._watermark)] = self._watermark
            known = np.zeros(size, dtype=np.bool_)
            known[: len(self._known)] = self._known
            self._ends, self._watermark, self._known = ends, watermark, known
            self._index.add_partitions(size)
        self._ends[partition] = NO_SLOT
        self._watermark[partition] = NEVER
        self._known[partition] = True
        self._partitions[partition] = None

    def _find_or_add(
        self,
        partitions: np.ndarray,
        buffer: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        out: np.ndarray,
        pend: bool,
    ) -> None:
        """The slot of each key into `out`, a new key given a slot (pending when `pend`),
        making room whenever the kernel runs out of it.
        """
        index, row = self._index, 0
        index.reserve(len(partitions), self.columns)
        while True:
            c = self.columns
            row = find_or_add(
                row, partitions, buffer, starts, lengths, out, pend, index.secret, index.table,
                c.key_hash,
                c.key, c.partition, c.held, c.pending, index.arena, index.free, index.meta,
                index.counts,
            )  # fmt: skip
            if row == len(partitions):
                return
            rest = len(partitions) - row  # room for every row left to be new, at worst
            self._room(max(0, rest - int(index.meta[FREE])))
            index.room_for(int(lengths[row:].sum()), self.columns)

    def _add_all(self, partition: int, keys: list[bytes]) -> np.ndarray:
        """Slots for `keys`, new users of `partition` (a restore's)."""
        out = np.empty(len(keys), dtype=np.int64)
        partitions = np.full(len(keys), partition, dtype=np.int64)
        self._find_or_add(partitions, *spans(keys), out, pend=False)
        return out

    def _lookup(self, partition: int, keys: list[bytes]) -> np.ndarray:
        """The slot of each of `keys` in `partition`, NO_SLOT for a user not held."""
        out = np.empty(len(keys), dtype=np.int64)
        c, index = self.columns, self._index
        lookup(
            np.full(len(keys), partition, dtype=np.int64), *spans(keys), out, index.secret,
            index.table, c.key, index.arena,
        )  # fmt: skip
        return out

    def _room(self, fresh: int) -> None:
        """Grow the columns, by doubling, until `fresh` never-used slots are left."""
        while self._index.unused + fresh > len(self.columns.ints):
            self.columns = self.columns.grown(2 * len(self.columns.ints))
            self._index.resized(self.columns)

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
        c, index = self.columns, self._index
        if tombstones:
            keys = index.keys(slots, c)
            for partition, key in zip(c.partition[slots].tolist(), keys, strict=True):
                self._tombstones.setdefault(partition, []).append(key)
        self._remove(slots)
        index.release(slots)

    def _remove(self, slots: np.ndarray) -> None:
        """Take `slots` out of the index; they are not free until `KeyIndex.release`."""
        c, index = self.columns, self._index
        remove(
            slots, index.table, c.key_hash, c.key, c.held, index.meta, index.counts,
        )  # fmt: skip

    # -- the store's interface ----------------------------------------------------------------

    def mark_changed(self, slots: np.ndarray) -> None:
        """Remember the slots a kernel newly flagged changed (`fold` returns them)."""
        self._changed.extend(slots.tolist())

    def evict(self) -> None:
        """Drop idle users past the TTL, then the least recent above `max_users`."""
        order = np.fromiter(self._partitions, dtype=np.int64, count=len(self._partitions))
        counts = self._index.counts[order]
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

    def take_changes(self) -> StateChanges:
        """Pending changelog records of every partition: tombstones, the changed users'
        state bytes (encoded now, made into records when read: `StateChanges`), then the
        control records.
        """
        tombstones: list[StateChange] = []
        for partition, keys in self._tombstones.items():
            slots = self._lookup(partition, keys).tolist()  # a key may be back since
            tombstones.extend(
                StateChange(partition, key, None)
                for key, slot in zip(keys, slots, strict=True)
                if slot == NO_SLOT
            )
        self._tombstones.clear()
        slots = np.asarray(self._changed, dtype=np.int64)
        self._changed.clear()
        c = self.columns
        slots = slots[c.changed[slots]]  # a slot flagged twice, or since freed
        slots = np.unique(slots)
        c.changed[slots] = False
        buffer, starts = self.encode(slots)
        joined_keys, key_starts = self._index.gather(slots, c)
        controls = [StateChange(p, key, value) for (p, key), value in self._controls.items()]
        self._controls.clear()
        return StateChanges(
            tombstones,
            c.partition[slots].tolist(),
            joined_keys.tobytes(),
            key_starts.tolist(),
            buffer.tobytes(),
            starts.tolist(),
            controls,
        )

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
        self.pool.reserve(min(users, len(self.columns.ints)))

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
            self._see(np.array([partition], dtype=np.int64))
            last = dict(zip(keys[first:end], range(first, end), strict=True))
            run = list(last)
            at = np.fromiter(last.values(), dtype=np.int64, count=len(run))
            if order is not None:
                at = order[at]  # the record's index in the batch
            put = has_value[at]
            slots = self._lookup(partition, run)
            new = np.flatnonzero(put & (slots == NO_SLOT))
            if len(new):
                slots[new] = self._add_all(partition, [run[j] for j in new.tolist()])
            gone = slots[~put & (slots != NO_SLOT)]
            self._remove(gone)  # leaves the index now, frees its slot after the batch
            deleted.extend(gone.tolist())
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
        freed = np.array(deleted, dtype=np.int64)
        self._unpool(freed)
        self._index.release(freed)  # only now: a slot must not be reused within the batch

    def export(self, partition: int) -> PartitionState | None:
        """The partition's users, least recently updated first, as its changelog would
        restore them; None while it has changelog records pending (`take_changes`), since
        then the export would hold state that its changelog does not.
        """
        if self._tombstones.get(partition) or any(p == partition for p, _ in self._controls):
            return None
        users = self._users_of(partition)
        slots = np.empty(users, dtype=np.int64)
        head = int(self._ends[partition, 0]) if users else NO_SLOT
        if _chain(head, self.columns.next, slots) != users:
            return None  # a user allocated but not yet folded in (not linked yet)
        if self.columns.changed[slots].any():
            return None
        values, starts = self.encode(slots)
        controls = {k: v for (p, k), v in self._latest_controls.items() if p == partition}
        key_bytes, key_starts = self._index.gather(slots, self.columns)
        return PartitionState(key_bytes, key_starts, values, starts, controls)

    def _users_of(self, partition: int) -> int:
        """Users held of `partition`."""
        known = partition < len(self._known) and self._known[partition]
        return int(self._index.counts[partition]) if known else 0

    def load(self, partition: int, state: PartitionState, *, checked: bool = False) -> None:
        """Take an export of `partition`, which holds no users here yet. Raises ValueError,
        having loaded nothing, when a value is not a user state (unless `checked`: it
        passed `holds_user_states`) or a key repeats.
        """
        self._see(np.array([partition], dtype=np.int64))
        if users := self._users_of(partition):
            raise ValueError(f"partition {partition} already holds {users} users")
        refused = ValueError(f"partition {partition}'s export is not a set of user states")
        if not checked and not holds_user_states(state):
            raise refused
        slots = np.empty(state.users, dtype=np.int64)
        starts = state.key_starts
        self._find_or_add(
            np.full(state.users, partition, dtype=np.int64), state.key_bytes, starts[:-1],
            np.diff(starts), slots, pend=False,
        )  # fmt: skip
        if self._users_of(partition) != state.users:  # a key twice: take them out again
            added = np.unique(slots)
            self._remove(added)
            self._index.release(added)
            raise refused
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
        if partition not in self._partitions:
            return
        c, unused = self.columns, self._index.unused
        slots = np.flatnonzero(c.held[:unused] & (c.partition[:unused] == partition))
        c.changed[slots] = False
        c.pending[slots] = False
        c.prev[slots] = c.next[slots] = NO_SLOT
        self._release(slots.astype(np.int64), tombstones=False)
        del self._partitions[partition]
        self._known[partition] = False
        self._tombstones.pop(partition, None)
        self._ends[partition] = NO_SLOT
        self._watermark[partition] = NEVER

    def slot_of(self, partition: int, key: bytes) -> int:
        """The slot of a held user, or NO_SLOT."""
        return int(self._lookup(partition, [key])[0])

    def partitions(self) -> list[int]:
        """Partitions with state here."""
        return list(self._partitions)

    def users(self) -> int:
        """Users held across all partitions."""
        return int(self._index.counts.sum())

    def estimate_bytes(self) -> int:
        """Bytes held by user states: the slots used so far, the pool rows in use, and the
        key index (its table, arena and free stack). Constant time: the loop samples it.
        """
        slot = self.columns.nbytes() // len(self.columns.ints)
        pooled = self.pool.row_bytes() * self.pool.used()
        return slot * self._index.unused + pooled + self._index.nbytes()

    def recency(self, partition: int) -> list[bytes]:
        """The partition's keys, least recently updated first (tests)."""
        out: list[bytes] = []
        slot = int(self._ends[partition, 0]) if partition in self._partitions else NO_SLOT
        while slot != NO_SLOT:
            out.append(self._index.key(slot, self.columns))
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
def touch(
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
    """`FeatureStore.get` without the return: a new user's first fields, then the slot moved
    to its partition's most recent end; True when the slot was newly flagged changed.
    """
    p = partition[slot]
    if pending[slot]:
        pending[slot] = False
        ints[slot, :] = NEVER
        ints[slot, FIRST_SEEN] = ints[slot, SESSION_START] = ints[slot, COUNTER_TIME] = now_ms
        ints[slot, SESSION_EVENTS] = ints[slot, SESSION_VIEWS] = 0
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


def holds_user_states(state: PartitionState) -> bool:
    """Whether every value of an export is a user state this build reads (no table needed:
    a restore checks a snapshot on the thread that reads it).
    """
    return bool(_check(state.values, state.starts) < 0)


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

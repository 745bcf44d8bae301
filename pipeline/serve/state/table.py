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

from itertools import pairwise

import numpy as np

from pipeline.serve.state.byteform import (
    PartitionState,
    check_values,
    encode_users,
    holds_user_states,
    restore_users,
)
from pipeline.serve.state.changes import StateChange, StateChanges
from pipeline.serve.state.keys import FREE, KeyIndex, find_or_add, lookup, remove, spans
from pipeline.serve.state.layout import (
    HEADER_BYTES,
    INLINE_EVENTS,
    KINDS,
    NO_SLOT,
    Columns,
    Pool,
    Slots,
    Var,
)
from pipeline.serve.state.recency import Recency, chain, linked, pick_evictions, unlink
from pipeline.serve.state.reference import (
    NEVER,
)

SCRATCH = 0


# The first byte of a changelog key that is not a user's: user ids are the keys of valid
# events, which equal the event's UTF-8 user_id, and 0xFF never occurs in UTF-8.
CONTROL = b"\xff"


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

    def slots_view(self) -> Slots:
        """Every slot's state, for a kernel (after `pool.reserve` when it may promote).
        Take it again after anything that may grow the columns (`slots`, `restore`).
        """
        c = self.columns
        return Slots(c.ints, c.floats, c.history_len, c.items_len, c.seen_len, self.var())

    def recency_view(self) -> Recency:
        """The recency lists, for a kernel (taken again, as `slots_view`, after growth)."""
        c = self.columns
        return Recency(
            c.pending, c.changed, c.prev, c.next, c.partition, self._ends, self._watermark
        )

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
        evicted = pick_evictions(
            order, counts, self._ttl_ms, float(self.max_users), c.ints, self.recency_view()
        )
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
        if linked(slot, c.prev, self._ends, partition):
            unlink(slot, c.prev, c.next, self._ends, partition)
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
        encode_users(slots, starts, buffer, self.slots_view())
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
        bad = check_values(buffer, starts)
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
        self.pool.reserve(len(op))
        restore_users(
            op, which, buffer, starts, self.history_length, self.slots_view(),
            self.recency_view(), np.empty(KINDS, dtype=np.int64),
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
        if chain(head, self.columns.next, slots) != users:
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
        self.pool.reserve(len(slots))
        restore_users(
            slots, np.arange(len(slots)), state.values, state.starts, self.history_length,
            self.slots_view(), self.recency_view(), np.empty(KINDS, dtype=np.int64),
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

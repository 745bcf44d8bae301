"""The user table's layout: the slot columns (one row per slot), how many history events,
items and seen values a slot holds inline before its user moves to a pool row, the pool,
and what kernels take of them: `Slots` (each slot's fixed parts and lengths) with its
`Var` (every slot's variable parts, inline and pooled) and the accessors of those parts.
The key index (`keys`) reads the key columns; nothing here depends on the table or the
index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from pipeline.serve.kernel import (
    Bools,
    Float64s,
    Int32s,
    Int64s,
    UInt32s,
    UInt64s,
    inline_kernel,
    kernel,
)
from pipeline.serve.state.reference import (
    FLOAT_SLOTS,
    HEADER,
    INT_SLOTS,
    MAX_SEEN,
    MAX_SESSION_ITEMS,
    SEEN_KINDS,
)

KINDS = len(SEEN_KINDS)
HEADER_BYTES = HEADER.size
COUNTS_BYTES = 12  # the header ends with its six uint16 counts (history, items, seen kinds)
NO_SLOT = -1
INLINE_EVENTS = 8  # history events a slot holds before its user moves to a pool row
INLINE_ITEMS = 8
INLINE_SEEN = 2  # values per seen kind
Array = TypeVar("Array", bound=npt.NDArray[Any])


@dataclass(slots=True)
class Columns:
    """The state arrays, slot-major. Kernels take them as arguments."""

    ints: Int64s  # int64 (capacity, INT_SLOTS)
    floats: Float64s  # float64 (capacity, FLOAT_SLOTS)
    history: Int32s  # int32 (capacity, inline history entries): item, category, ...
    history_len: Int32s  # int32 (capacity,): entries used (two per event)
    items: Int32s  # int32 (capacity, INLINE_ITEMS)
    items_len: Int32s  # int32 (capacity,)
    seen_hash: UInt32s  # uint32 (capacity, KINDS, INLINE_SEEN): CRC-32 of the value
    seen_time: Int64s  # int64 (capacity, KINDS, INLINE_SEEN)
    seen_len: Int32s  # int32 (capacity, KINDS)
    big: Int32s  # int32 (capacity,): the slot's pool row + 1; 0 while inline
    pending: Bools  # bool (capacity,): allocated, initialised by its first event
    changed: Bools  # bool (capacity,): a changelog record is due
    prev: Int32s  # int32 (capacity,): LRU links within the slot's partition
    next: Int32s  # int32 (capacity,)
    partition: Int32s  # int32 (capacity,)
    # The user's key, for `keys.KeyIndex`: its hash, where its bytes are in the index's
    # arena, and whether the slot holds a user at all.
    key_hash: UInt64s  # uint64 (capacity,)
    key: Int64s  # int64 (capacity, 3): arena start, length, partition
    held: Bools  # bool (capacity,)

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
            key_hash=np.zeros(capacity, dtype=np.uint64),
            key=np.zeros((capacity, 3), dtype=np.int64),
            held=np.zeros(capacity, dtype=np.bool_),
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

    history: Int32s  # int32 (rows, 2 * history_length)
    items: Int32s  # int32 (rows, MAX_SESSION_ITEMS)
    seen_hash: UInt32s  # uint32 (rows, KINDS, MAX_SEEN)
    seen_time: Int64s  # int64 (rows, KINDS, MAX_SEEN)
    free: Int32s  # int32 (rows,): free rows, the next one to take last
    top: Int64s  # int64 (1,): how many of `free` are free

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

    def release(self, rows: Int64s) -> None:
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

    history: Int32s  # Columns.history
    items: Int32s
    seen_hash: UInt32s
    seen_time: Int64s
    big: Int32s
    pool_history: Int32s  # Pool.history
    pool_items: Int32s
    pool_hash: UInt32s
    pool_time: Int64s
    free: Int32s
    top: Int64s


class Slots(NamedTuple):
    """Every slot's state as kernels take it: the fixed parts, the lengths of the variable
    parts, and those parts (`Var`). `UserTable.slots_view` makes one.
    """

    ints: Int64s  # Columns.ints
    floats: Float64s
    history_len: Int32s
    items_len: Int32s
    seen_len: Int32s
    var: Var


@inline_kernel
def _part(s: int, big: Int32s, pooled: Array, inline: Array) -> Array:
    """Slot `s`'s row of one variable part: its pool row's while it has one (`big`)."""
    b = big[s]
    found: Array = pooled[b - 1] if b else inline[s]
    return found


@inline_kernel
def history_of(s: int, v: Var) -> Int32s:
    """Slot `s`'s history entries: inline, or its pool row's."""
    return _part(s, v.big, v.pool_history, v.history)


@inline_kernel
def items_of(s: int, v: Var) -> Int32s:
    """Slot `s`'s session items."""
    return _part(s, v.big, v.pool_items, v.items)


@inline_kernel
def hashes_of(s: int, v: Var) -> UInt32s:
    """Slot `s`'s seen hashes, (KINDS, room)."""
    return _part(s, v.big, v.pool_hash, v.seen_hash)


@inline_kernel
def times_of(s: int, v: Var) -> Int64s:
    """Slot `s`'s seen times, (KINDS, room)."""
    return _part(s, v.big, v.pool_time, v.seen_time)


@kernel
def promote(s: int, table: Slots) -> None:
    """Move slot `s`'s variable parts to a free pool row (one of them outgrew its room).
    The copies are clamped to the inline room: a reused slot may still carry the lengths of
    its previous user until they are set.
    """
    v = table.var
    if v.big[s]:
        return
    top = v.top[0]
    if top == 0:
        raise RuntimeError("user state pool exhausted: reserve rows before the kernel")
    row = v.free[top - 1]
    v.top[0] = top - 1
    v.big[s] = row + 1
    for k in range(min(table.history_len[s], v.history.shape[1])):
        v.pool_history[row, k] = v.history[s, k]
    for k in range(min(table.items_len[s], v.items.shape[1])):
        v.pool_items[row, k] = v.items[s, k]
    for kind in range(KINDS):
        for k in range(min(table.seen_len[s, kind], v.seen_hash.shape[2])):
            v.pool_hash[row, kind, k] = v.seen_hash[s, kind, k]
            v.pool_time[row, kind, k] = v.seen_time[s, kind, k]

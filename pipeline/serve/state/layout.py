"""The user table's slot layout: the state arrays kernels take, one row per slot, and how
many history events, items and seen values a slot holds inline before its user moves to a
pool row (`table.UserTable`). The key index (`keys`) reads the key columns; nothing here
depends on either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.serve.state.reference import (
    FLOAT_SLOTS,
    INT_SLOTS,
    MAX_SEEN,
    MAX_SESSION_ITEMS,
    SEEN_KINDS,
)

KINDS = len(SEEN_KINDS)
INLINE_EVENTS = 8  # history events a slot holds before its user moves to a pool row
INLINE_ITEMS = 8
INLINE_SEEN = 2  # values per seen kind


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
    # The user's key, for `keys.KeyIndex`: its hash, where its bytes are in the index's
    # arena, and whether the slot holds a user at all.
    key_hash: np.ndarray  # uint64 (capacity,)
    key: np.ndarray  # int64 (capacity, 3): arena start, length, partition
    held: np.ndarray  # bool (capacity,)

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

"""The user table's (partition, user key) → slot index, as arrays: an open-addressing hash
table of slot numbers over the keys' bytes, which live in one arena.

A Python dict keyed by bytes was the one per-user Python object left in the state: each user
cost a bytes object and a dict entry (about 100 bytes besides the key), and each event a dict
lookup in a Python loop. Here a batch's slots come from one kernel call that hashes the user
id where the decoded event holds it, and a user costs its key's bytes plus the per-slot key
columns of `layout.Columns` (hash, arena position, length, held).

Hand-written because numba has no hash map of byte strings that a kernel can share with the
caller across calls (its typed Dict boxes every key): the table is linear probing over
slot numbers (each tagged with bits of its key's hash), kept at most half full (its size is
a power of two, at least twice the users held), and deletion shifts the entries after the
gap back (Knuth, TAOCP vol. 3, algorithm 6.4R), so there are no tombstones to clean up.
Keys are hashed with the pseudonyms' SipHash-2-4 under a random key of the index's own, as
CPython keys its str and bytes hashes: user ids come from producers, and under an unkeyed
hash a producer could send ids that all probe one chain. The partition is mixed in by a
multiply with the golden ratio.

Slots are allocated here too, since a kernel allocates a new user's slot as it meets the
key: from a stack of freed slots first, then from the never-used ones. A kernel stops early
when there is no slot or arena room left; the caller makes room and calls again from there.
"""

from __future__ import annotations

import secrets

import numpy as np

from pipeline.serve.kernel import Bools, Bytes, Int32s, Int64s, UInt64s, inline_kernel, kernel
from pipeline.serve.records import join
from pipeline.serve.state.layout import Columns
from pipeline.serve.state.pseudonym import siphash

EMPTY = -1  # a table entry that holds no slot
# A table entry is a slot (low 32 bits) with the top 31 bits of its key's hash above it, so
# that a probe compares the tag it already holds before it reads the slot's key (another
# cache line). Entries are never negative, so never EMPTY.
_TAG = 32  # bits below the tag
_TAG_SHIFT = np.uint64(33)  # the hash's bits below the tag's
_SLOT = np.int64(0xFFFFFFFF)
# Columns of `Columns.key`, one row per slot: what a probe reads, in one cache line.
START, LENGTH, PARTITION = range(3)
# `KeyIndex.meta`: freed slots on the stack, the first never-used slot, the arena's end,
# and the arena bytes of keys since removed (reclaimed by compaction).
FREE, UNUSED, TOP, GARBAGE = range(4)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def table_size(keys: int) -> int:
    """Entries of a table for `keys` keys: a power of two, at least twice as many."""
    return 1 << max(4, (2 * keys - 1).bit_length())


class KeyIndex:
    """(partition, key) → slot for a table's `Columns`, with their slot allocator."""

    def __init__(self, capacity: int, first_slot: int) -> None:
        """An empty index for `capacity` slots; slots below `first_slot` are never given.

        The table is sized by the keys held, not by the slots' capacity, which is sized
        for the most users a process may hold: a table of mostly empty entries would spread
        a few keys over many cache lines and pages.
        """
        self.table = np.full(table_size(0), EMPTY, dtype=np.int64)
        self.secret = np.frombuffer(secrets.token_bytes(16), dtype=np.uint64).copy()  # k0, k1
        self.free = np.empty(capacity, dtype=np.int64)
        self.arena = np.empty(max(1024, 16 * capacity), dtype=np.uint8)
        self.meta = np.array([0, first_slot, 0, 0], dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)  # users per partition

    @property
    def unused(self) -> int:
        """The first slot never given."""
        return int(self.meta[UNUSED])

    def key_bytes(self) -> int:
        """Bytes of the keys held."""
        return int(self.meta[TOP] - self.meta[GARBAGE])

    def nbytes(self) -> int:
        """Bytes in use: the table, the arena up to its end, the free stack's slots (the
        arena and the stack are sized for the slot capacity, and untouched they take no
        memory).
        """
        return self.table.nbytes + int(self.meta[TOP]) + 8 * int(self.meta[FREE])

    def add_partitions(self, partitions: int) -> None:
        """Count users of partitions below `partitions`."""
        if partitions > len(self.counts):
            counts = np.zeros(max(partitions, 2 * len(self.counts)), dtype=np.int64)
            counts[: len(self.counts)] = self.counts
            self.counts = counts

    def resized(self, columns: Columns) -> None:
        """Follow `columns`, grown: room on the free stack for all their slots."""
        free = np.empty(len(columns.held), dtype=np.int64)
        free[: len(self.free)] = self.free
        self.free = free

    def reserve(self, keys: int, columns: Columns) -> None:
        """Keep the table at most half full with `keys` more keys: rehash into a bigger one
        when it would not be.
        """
        size = table_size(int(self.counts.sum()) + keys)
        if size > len(self.table):
            self.table = np.full(size, EMPTY, dtype=np.int64)
            _rehash(self.table, columns.key_hash, columns.held, self.unused)

    def room_for(self, key_bytes: int, columns: Columns) -> None:
        """Make sure `key_bytes` more bytes of keys fit in the arena: when they do not, copy
        the live keys into a new arena (the garbage left behind), doubled until they and
        `key_bytes` fill at most half of it.
        """
        top, garbage = int(self.meta[TOP]), int(self.meta[GARBAGE])
        if top + key_bytes <= len(self.arena):
            return
        live = top - garbage
        size = len(self.arena)
        while live + key_bytes > size // 2:
            size *= 2
        arena = np.empty(size, dtype=np.uint8)
        self.meta[TOP] = _compact(self.arena, arena, columns.key, columns.held, self.unused)
        self.meta[GARBAGE] = 0
        self.arena = arena

    def release(self, slots: Int64s) -> None:
        """Put `slots`, removed, on the free stack."""
        top = int(self.meta[FREE])
        self.free[top : top + len(slots)] = slots
        self.meta[FREE] = top + len(slots)

    def key(self, slot: int, columns: Columns) -> bytes:
        """The key of a held slot."""
        start, length = columns.key[slot, START : LENGTH + 1].tolist()
        return self.arena[start : start + length].tobytes()

    def gather(self, slots: Int64s, columns: Columns) -> tuple[Bytes, Int64s]:
        """The keys of held `slots` joined, and their offsets (len + 1)."""
        starts = np.zeros(len(slots) + 1, dtype=np.int64)
        np.cumsum(columns.key[slots, LENGTH], out=starts[1:])
        out = np.empty(int(starts[-1]), dtype=np.uint8)
        _gather(slots, columns.key, self.arena, out, starts)
        return out, starts

    def keys(self, slots: Int64s, columns: Columns) -> list[bytes]:
        """The keys of held `slots`, in order, as bytes (a changelog record's key)."""
        out, starts = self.gather(slots, columns)
        data = out.tobytes()
        bounds = starts.tolist()
        return [data[bounds[i] : bounds[i + 1]] for i in range(len(slots))]


def spans(keys: list[bytes]) -> tuple[Bytes, Int64s, Int64s]:
    """`keys` joined as `decode.join` joins a batch's values: the buffer, then each key's
    start and length in it, as the kernels take them.
    """
    buffer, bounds, _ = join(keys)
    return buffer, bounds[:-1], np.diff(bounds)


# --- kernels --------------------------------------------------------------------------------


@inline_kernel
def hash_key(secret: UInt64s, buf: Bytes, start: int, length: int, partition: int) -> np.uint64:
    """The hash of (partition, key) under the index's `secret`."""
    return siphash(secret, buf, start, length) ^ (np.uint64(partition) * _GOLDEN)


@inline_kernel
def _find(
    table: Int64s,
    key: Int64s,
    arena: Bytes,
    h: np.uint64,
    partition: int,
    buf: Bytes,
    start: int,
    length: int,
) -> int:
    """The table position of the key's entry, or of the empty entry that ends its probe."""
    mask = np.uint64(len(table) - 1)
    tag = np.int64(h >> _TAG_SHIFT)
    pos = h & mask
    while True:
        entry = table[pos]
        if entry == EMPTY:
            return int(pos)
        if (entry >> _TAG) == tag:
            s = entry & _SLOT
            if key[s, PARTITION] == partition and key[s, LENGTH] == length:
                at = key[s, START]
                same = True
                for k in range(length):
                    if arena[at + k] != buf[start + k]:
                        same = False
                        break
                if same:
                    return int(pos)
        pos = (pos + np.uint64(1)) & mask


@kernel
def lookup(
    partitions: Int64s,
    buf: Bytes,
    starts: Int64s,
    lengths: Int64s,
    out: Int64s,
    secret: UInt64s,
    table: Int64s,
    key: Int64s,
    arena: Bytes,
) -> None:
    """The slot of each (partition, key) into `out`, EMPTY for a key not held."""
    for i in range(len(partitions)):
        p, a, n = partitions[i], starts[i], lengths[i]
        h = hash_key(secret, buf, a, n, p)
        entry = table[_find(table, key, arena, h, p, buf, a, n)]
        out[i] = EMPTY if entry == EMPTY else entry & _SLOT


@kernel
def find_or_add(
    first: int,
    partitions: Int64s,
    buf: Bytes,
    starts: Int64s,
    lengths: Int64s,
    out: Int64s,
    pend: bool,
    secret: UInt64s,
    table: Int64s,
    key_hash: UInt64s,
    key: Int64s,
    parts: Int32s,
    held: Bools,
    pending: Bools,
    arena: Bytes,
    free: Int64s,
    meta: Int64s,
    counts: Int64s,
) -> int:
    """The slot of each (partition, key) from row `first` on into `out`, giving a key not
    held a slot (marked `pending` when `pend`). Returns the row it stopped at: the number of
    rows when done, less when a new key found no slot or arena room.
    """
    for i in range(first, len(partitions)):
        p, a, n = partitions[i], starts[i], lengths[i]
        h = hash_key(secret, buf, a, n, p)
        pos = _find(table, key, arena, h, p, buf, a, n)
        entry = table[pos]
        if entry != EMPTY:
            s = entry & _SLOT
        else:
            top = meta[TOP]
            if top + n > len(arena):
                return i
            if meta[FREE] > 0:
                meta[FREE] -= 1
                s = free[meta[FREE]]
            elif meta[UNUSED] < len(held):
                s = meta[UNUSED]
                meta[UNUSED] += 1
            else:
                return i
            for k in range(n):
                arena[top + k] = buf[a + k]
            meta[TOP] = top + n
            key[s, START], key[s, LENGTH], key[s, PARTITION] = top, n, p
            key_hash[s] = h
            parts[s] = p
            held[s] = True
            if pend:
                pending[s] = True
            counts[p] += 1
            table[pos] = (np.int64(h >> _TAG_SHIFT) << _TAG) | s
        out[i] = s
    return len(partitions)


@kernel
def remove(
    slots: Int64s,
    table: Int64s,
    key_hash: UInt64s,
    key: Int64s,
    held: Bools,
    meta: Int64s,
    counts: Int64s,
) -> None:
    """Take held `slots` out of the table (the caller frees them, `KeyIndex.release`); a
    slot not held, or named twice, is left alone.
    """
    mask = np.uint64(len(table) - 1)
    for i in range(len(slots)):
        s = slots[i]
        if not held[s]:
            continue
        gap = key_hash[s] & mask
        while table[gap] & _SLOT != s:  # a held slot's entry lies on its probe
            gap = (gap + np.uint64(1)) & mask
        # Backward shift: an entry after the gap moves into it unless its home position
        # lies cyclically in (gap, here], where a probe for it never passes the gap.
        here = gap
        while True:
            here = (here + np.uint64(1)) & mask
            t = table[here]
            if t == EMPTY:
                break
            home = key_hash[t & _SLOT] & mask
            stays = (gap < home <= here) if gap <= here else (home > gap or home <= here)
            if not stays:
                table[gap] = t
                gap = here
        table[gap] = EMPTY
        held[s] = False
        counts[key[s, PARTITION]] -= 1
        meta[GARBAGE] += key[s, LENGTH]


@kernel
def _rehash(table: Int64s, key_hash: UInt64s, held: Bools, unused: int) -> None:
    mask = np.uint64(len(table) - 1)
    for s in range(unused):
        if held[s]:
            h = key_hash[s]
            pos = h & mask
            while table[pos] != EMPTY:
                pos = (pos + np.uint64(1)) & mask
            table[pos] = (np.int64(h >> _TAG_SHIFT) << _TAG) | s


@kernel
def _compact(
    old: Bytes,
    new: Bytes,
    key: Int64s,
    held: Bools,
    unused: int,
) -> int:
    top = 0
    for s in range(unused):
        if held[s]:
            at, n = key[s, START], key[s, LENGTH]
            for k in range(n):
                new[top + k] = old[at + k]
            key[s, START] = top
            top += n
    return top


@kernel
def _gather(
    slots: Int64s,
    key: Int64s,
    arena: Bytes,
    out: Bytes,
    starts: Int64s,
) -> None:
    for i in range(len(slots)):
        s = slots[i]
        at, to = key[s, START], starts[i]
        for k in range(key[s, LENGTH]):
            out[to + k] = arena[at + k]

"""Per-user state, its compact byte form for the changelog, and the store that keeps it per
assigned input partition.

Memory is the constraint (≤ 2 KB per active user at L=50, so a million users fit in 2 GB),
so a user's state is a handful of typed `array`s rather than Python lists, sets and dicts of
boxed numbers: timestamps and counts in one int64 array, decayed counters in one float64
array (with the category affinities), the recent (item, category) sequence interleaved in one
int32 ring, and the devices, IPs, cards and countries seen as (pseudonym of the value,
last-seen time) pairs. A pseudonym is a keyed 32-bit hash (`pseudonym.py`): state, and the
changelog topic, hold no device id, IP, card fingerprint or country that could be recovered
without the key. The byte form is a fixed struct header followed by the arrays' raw
little-endian bytes, so encoding and decoding are a few memory copies.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections import OrderedDict

from pipeline.serve.spec import AFFINITY_SLOTS, WINDOWS_S
from pipeline.serve.state.changes import StateChange

if sys.byteorder != "little":  # the byte form is the arrays' native layout
    raise ImportError("streamscore's state encoding assumes a little-endian host")

NEVER = -1
MAX_SEEN = 16  # devices, IPs, cards and countries remembered per user (oldest evicted)
MAX_SESSION_ITEMS = 64

# Slots of `UserState.ints` (int64).
FIRST_SEEN, LAST_TIME, LAST_LOGIN, LAST_PURCHASE = 0, 1, 2, 3
SESSION_START, SESSION_LAST, COUNTER_TIME, OFFSET = 4, 5, 6, 7
SESSION_EVENTS, SESSION_VIEWS = 8, 9
INT_SLOTS = 10
# Slots of `UserState.floats` (float64): decayed counters per window, then the rest.
WINDOWS = len(WINDOWS_S)
EVENTS, PURCHASES = 0, WINDOWS  # EVENTS + i and PURCHASES + i for window i
AMOUNT_1H = 2 * WINDOWS
SESSION_NOVELTY = AMOUNT_1H + 1  # 4 flags: device, ip, country, card new this session
# Category affinity: AFFINITY_SLOTS (category id, decayed weight) pairs; ids are exact in a
# float64 below 2**53, and an empty slot has weight 0.
AFFINITY = SESSION_NOVELTY + 4
FLOAT_SLOTS = AFFINITY + 2 * AFFINITY_SLOTS
SEEN_KINDS = ("device", "ip", "country", "card")

FORMAT_VERSION = 1
# The byte form's fixed header: the format version, the int and float slots, the six counts.
HEADER = struct.Struct(f"<B{INT_SLOTS}q{FLOAT_SLOTS}d6H")


class UserState:
    """What the updater remembers about one user. Times are event-time milliseconds."""

    __slots__ = ("floats", "history", "ints", "seen", "session_items")

    def __init__(self, now_ms: int) -> None:
        """Fresh state for a user first seen at `now_ms`."""
        ints = array("q", [NEVER]) * INT_SLOTS
        ints[FIRST_SEEN] = ints[SESSION_START] = ints[COUNTER_TIME] = now_ms
        ints[SESSION_EVENTS] = ints[SESSION_VIEWS] = 0
        self.ints = ints
        self.floats = array("d", bytes(8 * FLOAT_SLOTS))
        self.history = array("i")  # item, category, item, category, ... oldest first
        self.session_items = array("i")
        # Per kind: pseudonym, last seen, pseudonym, last seen, ...
        self.seen = [array("q") for _ in SEEN_KINDS]

    def copy(self) -> UserState:
        """An independent copy (for scoring a late event without changing this state)."""
        other = UserState.__new__(UserState)
        other.ints = array("q", self.ints)
        other.floats = array("d", self.floats)
        other.history = array("i", self.history)
        other.session_items = array("i", self.session_items)
        other.seen = [array("q", kind) for kind in self.seen]
        return other

    def to_bytes(self) -> bytes:
        """The changelog form."""
        seen = self.seen
        header = HEADER.pack(
            FORMAT_VERSION,
            *self.ints,
            *self.floats,
            len(self.history),
            len(self.session_items),
            *(len(kind) for kind in seen),
        )
        return b"".join(
            (
                header,
                self.history.tobytes(),
                self.session_items.tobytes(),
                *(kind.tobytes() for kind in seen),
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UserState:
        """Inverse of `to_bytes`; raises ValueError on bytes it did not write."""
        if not data or data[0] != FORMAT_VERSION:
            raise ValueError("not a version-1 user state")
        fields = HEADER.unpack_from(data)
        state = cls.__new__(cls)
        state.ints = array("q", fields[1 : 1 + INT_SLOTS])
        state.floats = array("d", fields[1 + INT_SLOTS : 1 + INT_SLOTS + FLOAT_SLOTS])
        lengths = fields[1 + INT_SLOTS + FLOAT_SLOTS :]
        view = memoryview(data)[HEADER.size :]
        parts = []
        for code, length in zip("ii" + "q" * len(SEEN_KINDS), lengths, strict=True):
            part = array(code)
            size = length * part.itemsize
            part.frombytes(view[:size])
            view = view[size:]
            parts.append(part)
        if len(view):
            raise ValueError("trailing bytes after a user state")
        state.history, state.session_items, *state.seen = parts
        return state


class FeatureStore:
    """User states, one map per assigned partition, so a revoked partition drops cleanly.

    A partition's map is in least-recently-updated order. Users restored from the changelog
    stay as bytes until their first event. Every user updated or evicted since the last
    `take_changes` is a pending changelog record. Eviction: users idle for `ttl_s` of event
    time (against the newest event seen in their partition) and, above `max_users`, the least
    recently updated users of the largest partition.
    """

    def __init__(
        self, history_length: int, max_users: int = 2**62, ttl_s: float = float("inf")
    ) -> None:
        """An empty store; `history_length` bounds each user's recent item sequence."""
        self.history_length = history_length
        self.max_users = max_users
        self._ttl_ms = ttl_s * 1000.0
        self._partitions: dict[int, OrderedDict[str, UserState | bytes]] = {}
        self._changed: dict[int, set[str]] = {}
        self._watermark: dict[int, int] = {}
        self._count = 0
        self.evicted = 0

    def get(self, partition: int, user_id: str, now_ms: int) -> UserState:
        """The state of `user_id`, created on first sight; marks it changed and most recent."""
        users = self._partitions.get(partition)
        if users is None:
            users = self._partitions[partition] = OrderedDict()
        state = users.get(user_id)
        if state is None:
            state = users[user_id] = UserState(now_ms)
            self._count += 1
        elif type(state) is bytes:
            state = users[user_id] = UserState.from_bytes(state)
            users.move_to_end(user_id)
        else:
            users.move_to_end(user_id)
        self._changed.setdefault(partition, set()).add(user_id)
        if now_ms > self._watermark.get(partition, NEVER):
            self._watermark[partition] = now_ms
        assert type(state) is UserState
        return state

    def peek(self, partition: int, user_id: str) -> UserState | None:
        """The state of `user_id` if held, without marking it changed."""
        users = self._partitions.get(partition)
        state = None if users is None else users.get(user_id)
        if type(state) is bytes:
            state = self._partitions[partition][user_id] = UserState.from_bytes(state)
        assert state is None or type(state) is UserState
        return state

    def restore(self, partition: int, user_id: str, value: bytes | None) -> None:
        """Apply one changelog record (None deletes); later records win."""
        users = self._partitions.get(partition)
        if users is None:
            users = self._partitions[partition] = OrderedDict()
        if value is None:
            if users.pop(user_id, None) is not None:
                self._count -= 1
        elif user_id in users:
            users[user_id] = value
            users.move_to_end(user_id)
        else:
            users[user_id] = value  # a new key goes to the end already
            self._count += 1

    def evict(self) -> None:
        """Drop idle users past the TTL, then the least recent above `max_users`."""
        for partition, users in self._partitions.items():
            horizon = self._watermark.get(partition, NEVER) - self._ttl_ms
            while users:
                user_id, state = next(iter(users.items()))
                if _last_time(state) >= horizon:
                    break
                self._drop(partition, user_id)
        while self._count > self.max_users:
            partition, users = max(self._partitions.items(), key=lambda item: len(item[1]))
            self._drop(partition, next(iter(users)))

    def take_changes(self) -> list[StateChange]:
        """Pending changelog records of every partition."""
        changes = []
        for partition in list(self._changed):
            changed = self._changed.pop(partition)
            users = self._partitions.get(partition)
            for user_id in changed:
                state = None if users is None else users.get(user_id)
                value = state.to_bytes() if type(state) is UserState else state
                assert value is None or type(value) is bytes
                changes.append(StateChange(partition, user_id.encode(), value))
        return changes

    def drop_partition(self, partition: int) -> None:
        """Forget the state of a partition this process no longer owns."""
        users = self._partitions.pop(partition, None)
        self._count -= len(users or ())
        self._changed.pop(partition, None)
        self._watermark.pop(partition, None)

    def estimate_bytes(self, sample: int = 256) -> int:
        """Bytes held by user states, extrapolated from up to `sample` users per partition
        (array and object sizes; map overhead excluded).
        """
        measured = counted = 0
        for users in self._partitions.values():
            for _, state in zip(range(sample), users.values(), strict=False):
                measured += _size(state)
                counted += 1
        return 0 if counted == 0 else measured * self._count // counted

    def partitions(self) -> list[int]:
        """Partitions with state here."""
        return list(self._partitions)

    def users(self) -> int:
        """Users held across all partitions."""
        return self._count

    def _drop(self, partition: int, user_id: str) -> None:
        del self._partitions[partition][user_id]
        self._count -= 1
        self.evicted += 1
        self._changed.setdefault(partition, set()).add(user_id)  # becomes a tombstone


def _size(state: UserState | bytes) -> int:
    if type(state) is bytes:
        return sys.getsizeof(state)
    assert type(state) is UserState
    parts = [state.ints, state.floats, state.history, state.session_items, *state.seen]
    return sys.getsizeof(state) + sys.getsizeof(state.seen) + sum(map(sys.getsizeof, parts))


def _last_time(state: UserState | bytes) -> int:
    if type(state) is bytes:
        return int(HEADER.unpack_from(state)[1 + LAST_TIME])
    assert type(state) is UserState
    return state.ints[LAST_TIME]

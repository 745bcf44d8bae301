"""Scores and labels waiting for each other, by event id, and their changelog.

Both sides wait: a label can be read before its score (the labels topic and the scores
topic are read side by side, and a replayed pipeline re-serves scores). What waits is
bounded by age (`window_s` from when the monitor read it, so a monitor catching up on a
backlog does not expire what the backlog will join) and by count (`max_pending` each side,
the oldest leaving first); what leaves unjoined is counted in `expired`.

The waiting records are the monitor's only state that a restart must keep. `changes()`
gives what changed since its last call as changelog records (key: side and event id;
value: the waiting record, or None once it left), and `restore` reads them back. A record
that arrives and joins between two calls is never written.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

SCORES, LABELS = "score", "label"
_SIDE_BYTE = {SCORES: b"s", LABELS: b"l"}
_BYTE_SIDE = {b"s"[0]: SCORES, b"l"[0]: LABELS}
# seen_ms, arrived_ms, score, is_fraud; then the model version (UTF-8)
_VALUE = struct.Struct(">qqd?")


@dataclass(frozen=True, slots=True)
class Waiting:
    """One side of an event: a served score (with its model version), or a label;
    `arrived_ms` is when it was served or labelled, `seen_ms` when the monitor read it.
    """

    seen_ms: int
    arrived_ms: int
    version: str = ""
    score: float = 0.0
    is_fraud: bool = False

    def to_bytes(self) -> bytes:
        """The changelog value."""
        packed = _VALUE.pack(self.seen_ms, self.arrived_ms, self.score, self.is_fraud)
        return packed + self.version.encode()

    @classmethod
    def from_bytes(cls, value: bytes) -> Waiting:
        """The record `to_bytes` wrote."""
        seen_ms, arrived_ms, score, is_fraud = _VALUE.unpack_from(value)
        return cls(seen_ms, arrived_ms, value[_VALUE.size :].decode(), score, is_fraud)


@dataclass(frozen=True, slots=True)
class Pair:
    """A served score with its label."""

    version: str
    score: float
    is_fraud: bool
    scored_ms: int
    labelled_ms: int


def changelog_key(side: str, event_id: str, prefix: bytes = b"") -> bytes:
    """The changelog key of one side of an event, in the join of `prefix`."""
    return prefix + _SIDE_BYTE[side] + event_id.encode()


class Join:
    """The waiting records of both sides, bounded by age and count."""

    def __init__(self, window_s: float, max_pending: int, prefix: bytes = b"") -> None:
        """Hold each side at most `window_s` and at most `max_pending` records of it; its
        changelog keys start with `prefix` (one join per scored role shares a changelog).
        """
        self.prefix = prefix
        self._window_ms = window_s * 1000.0
        self._max = max_pending
        self._waiting: dict[str, OrderedDict[str, Waiting]] = {
            SCORES: OrderedDict(),
            LABELS: OrderedDict(),
        }
        self._touched: set[tuple[str, str]] = set()  # since the last changes()
        self._stored: set[tuple[str, str]] = set()  # in the changelog now
        self.expired = {SCORES: 0, LABELS: 0}

    def score(
        self, event_id: str, version: str, score: float, scored_ms: int, seen_ms: int
    ) -> Pair | None:
        """A served score, read at `seen_ms`: its Pair if its label was waiting, else it
        waits.
        """
        label = self._take(LABELS, event_id)
        if label is not None:
            return Pair(version, score, label.is_fraud, scored_ms, label.arrived_ms)
        self._wait(SCORES, event_id, Waiting(seen_ms, scored_ms, version, score))
        return None

    def label(self, event_id: str, is_fraud: bool, labelled_ms: int, seen_ms: int) -> Pair | None:
        """A label, read at `seen_ms`: its Pair if its score was waiting, else it waits."""
        served = self._take(SCORES, event_id)
        if served is not None:
            return Pair(served.version, served.score, is_fraud, served.arrived_ms, labelled_ms)
        self._wait(LABELS, event_id, Waiting(seen_ms, labelled_ms, is_fraud=is_fraud))
        return None

    def expire(self, now_ms: float) -> None:
        """Drop what was read longer than the window ago: each side is in reading order,
        so the oldest are at its front.
        """
        for side, waiting in self._waiting.items():
            while waiting:
                event_id, oldest = next(iter(waiting.items()))
                if now_ms - oldest.seen_ms <= self._window_ms:
                    break
                del waiting[event_id]
                self._touched.add((side, event_id))
                self.expired[side] += 1

    def pending(self) -> dict[str, int]:
        """Records waiting, per side."""
        return {side: len(waiting) for side, waiting in self._waiting.items()}

    def changes(self) -> list[tuple[bytes, bytes | None]]:
        """Changelog records for what changed since the last call: the waiting record for
        one that waits now, None for one written before that has left.
        """
        out: list[tuple[bytes, bytes | None]] = []
        for side, event_id in self._touched:
            found = self._waiting[side].get(event_id)
            key = (side, event_id)
            if found is not None:
                out.append((changelog_key(side, event_id, self.prefix), found.to_bytes()))
                self._stored.add(key)
            elif key in self._stored:
                out.append((changelog_key(side, event_id, self.prefix), None))
                self._stored.discard(key)
        self._touched.clear()
        return out

    def owns(self, key: bytes) -> bool:
        """Whether changelog `key` is one of this join's."""
        rest = key[len(self.prefix) :]
        return key.startswith(self.prefix) and bool(rest) and rest[0] in _BYTE_SIDE

    def restore(self, records: Iterable[tuple[bytes, bytes | None]]) -> int:
        """Rebuild the waiting records from the changelog, read in order (only the keys
        this join `owns`); the count kept.
        """
        latest: dict[bytes, bytes | None] = {}
        for key, value in records:
            if self.owns(key):
                latest[key[len(self.prefix) :]] = value
        rows = []
        for key, value in latest.items():
            if value is not None:
                rows.append((_BYTE_SIDE[key[0]], key[1:].decode(), Waiting.from_bytes(value)))
        rows.sort(key=lambda row: row[2].seen_ms)  # expiry reads the oldest first
        for side, event_id, waiting in rows:
            self._waiting[side][event_id] = waiting
            self._stored.add((side, event_id))
        return len(rows)

    def _take(self, side: str, event_id: str) -> Waiting | None:
        found = self._waiting[side].pop(event_id, None)
        if found is not None:
            self._touched.add((side, event_id))
        return found

    def _wait(self, side: str, event_id: str, waiting: Waiting) -> None:
        queue = self._waiting[side]
        queue.pop(event_id, None)  # a duplicate (a re-served score) replaces the older one
        queue[event_id] = waiting
        self._touched.add((side, event_id))
        if len(queue) > self._max:
            oldest, _ = queue.popitem(last=False)
            self._touched.add((side, oldest))
            self.expired[side] += 1

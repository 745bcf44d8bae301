"""Encode: one compiled pass writes a batch's FraudScore and Recommendation records (and a
shadow-scored challenger's FraudScore records), each with its 5-byte wire header, into one
buffer per topic.

The event_id and user_id bytes are copied straight from the input buffer's spans. The
reference is fastavro's writer over the same records as dicts;
tests/pipeline/serve/test_encode.py checks the bytes are equal.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

import schemas
from pipeline.serve.kernel import Bytes, Float32s, Float64s, Int64s, kernel
from pipeline.serve.records import (
    EVENT_ID,
    TIME,
    USER_ID,
    EventArrays,
    EventColumns,
    Scored,
    ShadowScored,
)
from pipeline.serve.score import REASON_NAMES
from schemas.catalog import Catalog, StaticCatalog
from schemas.codec import MAGIC_BYTE

_VARINT_MAX = 10  # bytes of the longest zig-zag varint


def _strings(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    data = [name.encode() for name in names]
    starts = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in data], out=starts[1:])
    return np.frombuffer(b"".join(data), dtype=np.uint8).copy(), starts


_REASONS, _REASON_STARTS = _strings(REASON_NAMES)


@dataclass(frozen=True, slots=True)
class Encoded:
    """A batch's output records: per topic one buffer and the records' offsets in it."""

    fraud: bytes
    fraud_starts: list[int]  # record i is fraud[starts[i]:starts[i + 1]]
    recommendations: bytes
    recommendation_starts: list[int]
    shadow: bytes = b""  # the challenger's FraudScore records of the same rows, if any
    shadow_starts: list[int] = field(default_factory=lambda: [0])


class OutputEncoder:
    """Writes FraudScore and Recommendation records of scored batches."""

    def __init__(self, catalog: Catalog | None = None) -> None:
        """Frame with the ids of `catalog` (default: the static catalog's)."""
        catalog = catalog if catalog is not None else StaticCatalog()
        self._fraud_header = _header(catalog.output_id(schemas.FRAUD_SCORE))
        self._recommendation_header = _header(catalog.output_id(schemas.RECOMMENDATION))

    def encode(self, columns: EventColumns, scored: Scored) -> Encoded:
        """The records of `scored`, whose rows are rows of `columns`."""
        rows = scored.rows
        spans = columns.spans
        fraud, fraud_starts = self._fraud(columns, scored, scored)
        shadow, shadow_starts = b"", [0]
        if scored.shadow is not None:
            shadow, shadow_starts = self._fraud(columns, scored, scored.shadow)
        ranked_rows = rows[scored.ranked]
        rank_name, rank_version = (s.encode() for s in scored.ranking_model)
        name = np.frombuffer(rank_name + rank_version, dtype=np.uint8)
        bound = (
            len(self._recommendation_header)
            + spans[ranked_rows, EVENT_ID, 1]
            + spans[ranked_rows, USER_ID, 1]
            + 8 * _VARINT_MAX
            + scored.item_count * (_VARINT_MAX + 8)
            + len(name)
        )
        recommendations, recommendation_starts = _allocate(bound)
        _recommendations(
            recommendations, recommendation_starts, self._recommendation_header,
            columns.arrays(), ranked_rows,
            scored.items, scored.item_scores, scored.item_count, name, len(rank_name),
            scored.scored_time, np.empty(1, dtype=np.float64),
        )  # fmt: skip
        return Encoded(
            fraud=fraud,
            fraud_starts=fraud_starts,
            recommendations=recommendations[: recommendation_starts[-1]].tobytes(),
            recommendation_starts=recommendation_starts.tolist(),
            shadow=shadow,
            shadow_starts=shadow_starts,
        )

    def _fraud(
        self, columns: EventColumns, scored: Scored, fraud: Scored | ShadowScored
    ) -> tuple[bytes, list[int]]:
        """FraudScore records of `scored`'s rows with `fraud`'s scores (its own, or its
        challenger's): the buffer and each record's start.
        """
        rows = scored.rows
        spans = columns.spans
        id_bytes = spans[rows, EVENT_ID, 1] + spans[rows, USER_ID, 1]
        fraud_name, fraud_version = (s.encode() for s in fraud.fraud_model)
        name = np.frombuffer(fraud_name + fraud_version, dtype=np.uint8)
        reasons = fraud.reasons.shape[1]
        longest = int(np.diff(_REASON_STARTS).max())
        bound = (
            len(self._fraud_header)
            + id_bytes
            + 8 * _VARINT_MAX
            + 8
            + reasons * (longest + _VARINT_MAX + 8)
            + len(name)
        )
        out, starts = _allocate(bound)
        _fraud_scores(
            out, starts, self._fraud_header, columns.arrays(), rows, fraud.score, fraud.decision,
            fraud.reasons, fraud.contributions, fraud.reason_count, _REASONS, _REASON_STARTS, name,
            len(fraud_name), scored.scored_time, np.empty(1, dtype=np.float64),
        )  # fmt: skip
        return out[: starts[-1]].tobytes(), starts.tolist()


def _header(schema_id: int) -> np.ndarray:
    header = struct.pack(">bI", MAGIC_BYTE, schema_id)
    return np.frombuffer(header, dtype=np.uint8).copy()


def _allocate(bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A buffer large enough for records of at most `bound` bytes each, and their starts."""
    starts = np.zeros(len(bound) + 1, dtype=np.int64)
    return np.empty(int(bound.sum()), dtype=np.uint8), starts


@kernel
def _long(out: Bytes, at: int, value: int) -> int:
    n = np.uint64((value << 1) ^ (value >> 63))
    while n > 0x7F:
        out[at] = np.uint8((n & np.uint64(0x7F)) | np.uint64(0x80))
        n >>= np.uint64(7)
        at += 1
    out[at] = np.uint8(n)
    return at + 1


@kernel
def _copy(out: Bytes, at: int, source: np.ndarray, start: int, length: int) -> int:
    at = _long(out, at, length)
    for k in range(length):  # a loop: numba's slice copy may allocate, which a kernel cannot
        out[at + k] = source[start + k]
    return at + length


@kernel
def _double(out: Bytes, at: int, value: float, scratch: Float64s) -> int:
    scratch[0] = value
    raw = scratch.view(np.uint8)
    for k in range(8):  # a loop, as in `_copy`
        out[at + k] = raw[k]
    return at + 8


@kernel
def _head(out: Bytes, at: int, header: Bytes, buf: Bytes, spans: Int64s, time: int) -> int:
    """The wire header, then the fields both records start with: event_id, user_id (copied
    from the input's spans) and event_time.
    """
    for k in range(len(header)):
        out[at + k] = header[k]
    at += len(header)
    at = _copy(out, at, buf, spans[EVENT_ID, 0], spans[EVENT_ID, 1])
    at = _copy(out, at, buf, spans[USER_ID, 0], spans[USER_ID, 1])
    return _long(out, at, time)


@kernel
def _tail(out: Bytes, at: int, model: Bytes, name_length: int, ingest: int, scored: int) -> int:
    """The fields both records end with: model name and version, ingest and scored time."""
    at = _copy(out, at, model, 0, name_length)
    at = _copy(out, at, model, name_length, len(model) - name_length)
    at = _long(out, at, ingest)
    return _long(out, at, scored)


@kernel
def _fraud_scores(
    out: Bytes,
    starts: Int64s,
    header: Bytes,
    events: EventArrays,
    rows: Int64s,
    score: Float32s,
    decision: Int64s,
    reasons: Int64s,
    contributions: Float32s,
    reason_count: Int64s,
    names: Bytes,
    name_starts: Int64s,
    model: Bytes,
    name_length: int,
    scored_time: int,
    scratch: Float64s,
) -> None:
    buf, spans, longs, ingest_time = events.buffer, events.spans, events.longs, events.ingest_time
    at = 0
    for i in range(len(rows)):
        row = rows[i]
        starts[i] = at
        at = _head(out, at, header, buf, spans[row], longs[row, TIME])
        at = _double(out, at, np.float64(score[i]), scratch)
        at = _long(out, at, decision[i])
        count = reason_count[i]
        if count > 0:
            at = _long(out, at, count)
            for k in range(count):
                j = reasons[i, k]
                at = _copy(out, at, names, name_starts[j], name_starts[j + 1] - name_starts[j])
                at = _double(out, at, np.float64(contributions[i, k]), scratch)
        out[at] = 0  # the array's end
        at = _tail(out, at + 1, model, name_length, ingest_time[row], scored_time)
    starts[len(rows)] = at


@kernel
def _recommendations(
    out: Bytes,
    starts: Int64s,
    header: Bytes,
    events: EventArrays,
    rows: Int64s,
    items: Int64s,
    item_scores: Float32s,
    item_count: Int64s,
    model: Bytes,
    name_length: int,
    scored_time: int,
    scratch: Float64s,
) -> None:
    buf, spans, longs, ingest_time = events.buffer, events.spans, events.longs, events.ingest_time
    at = 0
    for i in range(len(rows)):
        row = rows[i]
        starts[i] = at
        at = _head(out, at, header, buf, spans[row], longs[row, TIME])
        count = item_count[i]
        if count > 0:
            at = _long(out, at, count)
            for k in range(count):
                at = _long(out, at, items[i, k])
                at = _double(out, at, np.float64(item_scores[i, k]), scratch)
        out[at] = 0  # the array's end
        at = _tail(out, at + 1, model, name_length, ingest_time[row], scored_time)
    starts[len(rows)] = at

"""Decode and validate: a consumed batch becomes columns in one compiled pass.

The batch's values are joined into one buffer with an offsets array; `_decode_rows` walks it
for the ClickEvent reader schema and writes typed columns, string fields as (start, length)
spans into the buffer, the candidates as one flat array with per-row spans, and a status
code per row. Nothing per event is a Python object.

The kernel only ever says "valid" or "not mine". A row it refuses (bad bytes, a broken
validation rule, another writer schema, an encoding it does not take, such as a negative
array block count) goes to the reference path, `codec.Decoder` plus `events.validate`. That
path gives the dead letter its exact reason and message, or accepts the record (an older
writer schema resolved to the reader's), which is re-encoded in the reader schema and decoded
by the kernel with the rest. Bad input is rare, so the reference path's cost does not show,
and the kernel need not copy fastavro's every quirk: it must only never accept what the
reference refuses, and must decode what it accepts to the same values
(tests/pipeline/serve/test_decode.py checks both on random and mutated payloads).
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter

import numpy as np
from confluent_kafka import Message

import schemas
from pipeline.serve.events import STRING_FIELDS, validate
from pipeline.serve.kernel import Bools, Bytes, Float64s, Int8s, Int64s, inline_kernel, kernel
from pipeline.serve.records import (
    AMOUNT,
    BILLING_COUNTRY,
    CARD_FINGERPRINT,
    CATEGORY,
    COUNTRY,
    CURRENCY,
    DEVICE_ID,
    EVENT_ID,
    EVENT_TYPE_SYMBOLS,
    HAS_AMOUNT,
    HAS_CATEGORY,
    HAS_ITEM,
    HAS_PRICE,
    HAS_QUANTITY,
    IP,
    ITEM,
    METHOD,
    NULL,
    PAYMENT_METHOD_SYMBOLS,
    PRICE,
    QUANTITY,
    SEARCH_QUERY,
    TIME,
    TYPE,
    USER_AGENT,
    USER_ID,
    EventColumns,
    Rejected,
    join,
)
from pipeline.settings import LimitSettings
from schemas.catalog import Catalog, StaticCatalog
from schemas.codec import DecodeError, Decoder, Encoder

# The wire id of a row that the reference path resolved and re-encoded in the reader schema,
# for the kernel's second pass only: the kernel takes it in that pass alone, and every row
# that carried it on the wire was already rejected or re-encoded by the reference path.
RESOLVED_ID = 0xFFFFFFFF
_TIME = itemgetter(1)  # of Message.timestamp(): (type, ms)


# Row status. OK rows are decoded; any other code sends the row to the reference path, which
# decides (its kind is the dead letter's). The names are the error kinds they stand for.
STATUS_KINDS = (
    "ok",
    "decode.empty_payload",
    "decode.payload_too_large",
    "decode.truncated",
    "decode.bad_magic_byte",
    "decode.other_writer_schema",  # not an error: resolved by the reference path
    "decode.malformed",
    "decode.invalid_utf8",
    "decode.invalid_index",
    "decode.trailing_bytes",
    "validate.key_missing",
    "validate.user_id_empty",
    "validate.event_id_empty",
    "validate.key_mismatch",
    "validate.string_too_long",
    "validate.price_not_finite",
    "validate.price_negative",
    "validate.price_too_large",
    "validate.payment_amount_not_finite",
    "validate.payment_amount_negative",
    "validate.payment_amount_too_large",
    "validate.quantity_out_of_range",
    "validate.event_time_future",
    "validate.event_time_too_old",
    "validate.too_many_candidates",
)
(
    OK,
    EMPTY,
    TOO_LARGE,
    TRUNCATED,
    BAD_MAGIC,
    OTHER_SCHEMA,
    MALFORMED,
    INVALID_UTF8,
    INVALID_INDEX,
    TRAILING,
    KEY_MISSING,
    USER_ID_EMPTY,
    EVENT_ID_EMPTY,
    KEY_MISMATCH,
    STRING_TOO_LONG,
    PRICE_NOT_FINITE,
    PRICE_NEGATIVE,
    PRICE_TOO_LARGE,
    AMOUNT_NOT_FINITE,
    AMOUNT_NEGATIVE,
    AMOUNT_TOO_LARGE,
    QUANTITY_RANGE,
    TIME_FUTURE,
    TIME_TOO_OLD,
    TOO_MANY_CANDIDATES,
) = range(len(STATUS_KINDS))

_EVENT_TYPES = len(EVENT_TYPE_SYMBOLS)
_PAYMENT_METHODS = len(PAYMENT_METHOD_SYMBOLS)


def _rejected(positions: Int64s, row: int, kind: str, detail: str) -> Rejected:
    return Rejected(row, int(positions[row, 0]), int(positions[row, 1]), kind, detail)


class BatchDecoder:
    """Decodes consumed ClickEvent messages into EventColumns, refusing bad ones as data."""

    def __init__(self, limits: LimitSettings, catalog: Catalog | None = None) -> None:
        """Validate against `limits`; writer ids are looked up in `catalog` (default: the
        static catalog).

        The kernel takes the ids whose writer schema is the reader's. In the static mode
        that is the catalog's id; with a registry each is learned the first time the
        reference path reads it, so one message per id pays for the lookup.
        """
        self._limits = limits
        self._reference = Decoder(schemas.CLICK_EVENT, catalog)
        self._resolved = Encoder(schemas.CLICK_EVENT, RESOLVED_ID)
        reader_ids = [schemas.CURRENT_ID[schemas.CLICK_EVENT]] if catalog is None else []
        if isinstance(catalog, StaticCatalog):
            reader_ids = [catalog.output_id(schemas.CLICK_EVENT)]
        self._reader_ids = np.array(reader_ids, dtype=np.int64)

    def decode(
        self, messages: Sequence[Message], now_ms: int
    ) -> tuple[EventColumns, list[Rejected]]:
        """Columns of `messages` (consumed, without errors) and those refused, in row order."""
        # A pass per column, `map` over Message's own methods: no Python frame per message
        # (370 against 430 ns an event for list comprehensions, which were half the cost of
        # one list of (partition, offset, timestamp) tuples made into an array).
        n = len(messages)
        positions = np.empty((n, 3), dtype=np.int64)
        positions[:, 0] = np.fromiter(map(Message.partition, messages), np.int64, n)
        positions[:, 1] = np.fromiter(map(Message.offset, messages), np.int64, n)
        positions[:, 2] = np.fromiter(map(_TIME, map(Message.timestamp, messages)), np.int64, n)
        values = list(map(Message.value, messages))
        return self.decode_values(values, list(map(Message.key, messages)), positions, now_ms)

    def decode_values(
        self,
        values: list[bytes | None],
        keys: list[bytes | None],
        positions: Int64s,
        now_ms: int,
    ) -> tuple[EventColumns, list[Rejected]]:
        """`decode` of values and keys whose (partition, offset, timestamp) rows are
        `positions` (int64, n x 3).

        Raises `schemas.registry.RegistryUnavailable`, having changed nothing, when a
        writer id must be looked up and the registry does not answer.
        """
        columns = self._run(values, keys, positions, now_ms, self._reader_ids)
        refused = np.flatnonzero(columns.status != OK)
        if not len(refused):
            return columns, []
        rejected: list[Rejected] = []
        substituted = False
        for row in refused.tolist():
            try:
                record = self._reference_decode(values[row], keys[row], now_ms)
            except DecodeError as error:
                rejected.append(_rejected(positions, row, error.kind, error.message))
                continue
            # Valid by the reference: another writer schema, or a writer id not yet known to
            # be the reader schema's. Decode its reader-schema form (framed with RESOLVED_ID).
            self._learn(values[row])
            values[row] = self._resolved.encode(record)
            substituted = True
        if substituted:
            ids = np.append(self._reader_ids, RESOLVED_ID)
            columns = self._run(values, keys, positions, now_ms, ids)
            refused_again = {r.row for r in rejected}
            for row in np.flatnonzero(columns.status != OK).tolist():
                if row not in refused_again:  # the reference accepts what the kernel refuses
                    kind = STATUS_KINDS[columns.status[row]]
                    rejected.append(_rejected(positions, row, kind, "refused after resolution"))
            rejected.sort(key=lambda r: r.row)
        return columns, rejected

    def _learn(self, value: bytes | None) -> None:
        """Let the kernel take the writer id of `value` (a valid event) from now on when its
        writer schema is the reader's.
        """
        schema_id = int.from_bytes(value[1:5], "big") if value else RESOLVED_ID
        if schema_id not in self._reader_ids and self._reference.writes_reader_schema(schema_id):
            self._reader_ids = np.append(self._reader_ids, schema_id)

    def _reference_decode(
        self, value: bytes | None, key: bytes | None, now_ms: int
    ) -> dict[str, object]:
        """The pure-Python path: fastavro and `events.validate`; the kernel's oracle."""
        limits = self._limits
        if value is not None and len(value) > limits.max_payload_bytes:
            raise DecodeError(
                "decode.payload_too_large",
                f"{len(value)} bytes, limit {limits.max_payload_bytes}",
            )
        record = self._reference.decode(value)
        validate(record, key, limits, now_ms)
        return record

    def _run(
        self,
        values: list[bytes | None],
        keys: list[bytes | None],
        positions: Int64s,
        now_ms: int,
        reader_ids: Int64s,
    ) -> EventColumns:
        n = len(values)
        buffer, starts, _ = join(values)
        key_buffer, key_starts, key_null = join(keys)
        limits = self._limits
        bounds = np.array(
            [
                limits.max_payload_bytes,
                limits.max_string_length,
                limits.max_quantity,
                limits.max_candidates,
            ],
            dtype=np.int64,
        )
        window = np.array(
            [
                limits.max_price,
                now_ms + limits.max_future_skew_s * 1000,
                now_ms - limits.max_event_age_s * 1000,
            ],
            dtype=np.float64,
        )
        status = np.zeros(n, dtype=np.int8)
        spans = np.zeros((n, len(STRING_FIELDS), 2), dtype=np.int64)
        longs = np.zeros((n, 6), dtype=np.int64)
        reals = np.zeros((n, 2), dtype=np.float64)
        present = np.zeros((n, 5), dtype=np.bool_)
        # Every candidate takes at least one byte: the buffer's length bounds their count.
        candidates = np.empty(len(buffer), dtype=np.int64)
        candidate_start = np.zeros(n + 1, dtype=np.int64)
        _decode_rows(
            buffer, starts, key_buffer, key_starts, key_null, reader_ids, bounds, window,
            status, spans, longs, reals, present, candidates, candidate_start,
            np.empty(8, dtype=np.uint8), np.zeros(len(STRING_FIELDS), dtype=np.int64),
        )  # fmt: skip
        where = positions
        return EventColumns(
            buffer=buffer,
            status=status,
            spans=spans,
            longs=longs,
            reals=reals,
            present=present,
            candidates=candidates[: candidate_start[n]].copy(),
            candidate_start=candidate_start,
            partition=where[:, 0].astype(np.int32),
            offset=where[:, 1].copy(),
            ingest_time=where[:, 2].copy(),
            keys=keys,
        )


# --- the kernel -------------------------------------------------------------------------------
# Avro binary (https://avro.apache.org/docs/1.12.0/specification/#binary-encoding): longs
# and ints are zig-zag varints, strings a long length then UTF-8, doubles 8 bytes little
# endian, a union a long branch index then the branch, an enum a long symbol index, arrays
# blocks of a long count then items, ended by a zero count. Each helper returns its value and
# the next position, or a negative position: -TRUNCATED, -MALFORMED and so on.


@inline_kernel
def varint(buf: Bytes, pos: int, end: int) -> tuple[int, int]:
    if pos >= end:
        return 0, -TRUNCATED
    first = np.int64(buf[pos])
    if first < 0x80:  # most values: one byte
        return int((first >> 1) ^ -(first & 1)), pos + 1
    result = np.uint64(first & 0x7F)
    shift = 7
    pos += 1
    while True:
        if pos >= end:
            return 0, -TRUNCATED
        byte = np.uint64(buf[pos])
        pos += 1
        if shift == 63 and byte > 1:
            return 0, -MALFORMED  # past 64 bits: the reference path decides
        result |= (byte & np.uint64(0x7F)) << np.uint64(shift)
        if byte < 0x80:
            break
        shift += 7
        if shift > 63:
            return 0, -MALFORMED
    return int(np.int64(result >> np.uint64(1)) ^ -np.int64(result & np.uint64(1))), pos


@kernel
def _utf8_chars(buf: Bytes, start: int, end: int) -> int:
    """Code points in buf[start:end], or -1 if it is not strict UTF-8 (as Python decodes:
    no overlongs, no surrogates, nothing above U+10FFFF).
    """
    high = 0
    for k in range(start, end):  # no early exit: compiled to wide ORs over the bytes
        high |= buf[k]
    if high < 0x80:  # ASCII, as most strings are: one code point a byte
        return end - start
    chars = 0
    i = start
    while i < end:
        b = buf[i]
        if b < 0x80:
            i += 1
        elif 0xC2 <= b <= 0xDF:
            if i + 1 >= end or (buf[i + 1] & 0xC0) != 0x80:
                return -1
            i += 2
        elif 0xE0 <= b <= 0xEF:
            if i + 2 >= end:
                return -1
            b1 = buf[i + 1]
            if (b1 & 0xC0) != 0x80 or (buf[i + 2] & 0xC0) != 0x80:
                return -1
            if b == 0xE0 and b1 < 0xA0:  # overlong
                return -1
            if b == 0xED and b1 >= 0xA0:  # surrogates
                return -1
            i += 3
        elif 0xF0 <= b <= 0xF4:
            if i + 3 >= end:
                return -1
            b1 = buf[i + 1]
            if (b1 & 0xC0) != 0x80 or (buf[i + 2] & 0xC0) != 0x80 or (buf[i + 3] & 0xC0) != 0x80:
                return -1
            if b == 0xF0 and b1 < 0x90:  # overlong
                return -1
            if b == 0xF4 and b1 >= 0x90:  # above U+10FFFF
                return -1
            i += 4
        else:
            return -1
        chars += 1
    return chars


@kernel
def _string(buf: Bytes, pos: int, end: int, spans: Int64s, field: int, chars: Int64s) -> int:
    """Read a string into span `field` of `spans` (one row's); its code points go to
    `chars[field]`.
    """
    length, pos = varint(buf, pos, end)
    if pos < 0:
        return pos
    if length < 0:
        return -MALFORMED
    if length > end - pos:
        return -TRUNCATED
    count = _utf8_chars(buf, pos, pos + length)
    if count < 0:
        return -INVALID_UTF8
    spans[field, 0] = pos
    spans[field, 1] = length
    chars[field] = count
    return pos + length


@inline_kernel
def _branch(buf: Bytes, pos: int, end: int) -> tuple[int, int]:
    """A ["null", T] union's branch: 0 null, 1 the value."""
    index, pos = varint(buf, pos, end)
    if pos < 0:
        return 0, pos
    if index < 0 or index > 1:
        return 0, -INVALID_INDEX
    return index, pos


@inline_kernel
def _double(buf: Bytes, pos: int, end: int, scratch: Bytes) -> tuple[float, int]:
    if end - pos < 8:
        return 0.0, -TRUNCATED
    for k in range(8):
        scratch[k] = buf[pos + k]
    return scratch.view(np.float64)[0], pos + 8


@kernel
def _decode_rows(
    buf: Bytes,
    starts: Int64s,
    keys: Bytes,
    key_starts: Int64s,
    key_null: Bools,
    reader_ids: Int64s,
    bounds: Int64s,
    window: Float64s,
    status: Int8s,
    spans: Int64s,
    longs: Int64s,
    reals: Float64s,
    present: Bools,
    candidates: Int64s,
    candidate_start: Int64s,
    scratch: Bytes,
    chars: Int64s,
) -> None:
    """Decode and validate every row; see the module docstring. `scratch` (8 bytes) and
    `chars` (one per string field) are its working space.
    """
    n_candidates = 0
    rows = len(starts) - 1
    for row in range(rows):
        candidate_start[row] = n_candidates
        spans[row, :, 1] = NULL
        longs[row, METHOD] = -1
        chars[:] = 0
        code = _row(
            buf, starts[row], starts[row + 1], reader_ids, bounds, spans[row], longs[row],
            reals[row], present[row], candidates, n_candidates, scratch, chars,
        )  # fmt: skip
        if code < 0:
            code = -code
        else:
            total = code
            code = _validate(
                keys[key_starts[row] : key_starts[row + 1]], key_null[row], buf, bounds, window,
                spans[row], longs[row], reals[row], present[row], total - n_candidates, chars,
            )  # fmt: skip
            if code == OK:
                n_candidates = total
        status[row] = code
    candidate_start[rows] = n_candidates


@kernel
def _row(
    buf: Bytes,
    start: int,
    end: int,
    reader_ids: Int64s,
    bounds: Int64s,
    spans: Int64s,
    longs: Int64s,
    reals: Float64s,
    present: Bools,
    candidates: Int64s,
    n_candidates: int,
    scratch: Bytes,
    chars: Int64s,
) -> int:
    """Decode one row into its slices of the columns; the candidate count after it, or
    -status.
    """
    size = end - start
    if size == 0:
        return -EMPTY
    if size > bounds[0]:
        return -TOO_LARGE
    if size < 5:
        return -TRUNCATED
    if buf[start] != 0:
        return -BAD_MAGIC
    written_id = (
        (np.int64(buf[start + 1]) << 24)
        | (np.int64(buf[start + 2]) << 16)
        | (np.int64(buf[start + 3]) << 8)
        | np.int64(buf[start + 4])
    )
    known = False
    for reader_id in reader_ids:  # the ids whose writer schema is the reader's: one or two
        known |= written_id == reader_id
    if not known:
        return -OTHER_SCHEMA
    pos = start + 5
    for field in range(3):  # event_id, user_id, session_id
        pos = _string(buf, pos, end, spans, field, chars)
        if pos < 0:
            return pos
    value, pos = varint(buf, pos, end)
    if pos < 0:
        return pos
    longs[TIME] = value
    value, pos = varint(buf, pos, end)
    if pos < 0:
        return pos
    if value < 0 or value >= _EVENT_TYPES:
        return -INVALID_INDEX
    longs[TYPE] = value
    # item_id, category_id: ["null", "long"]; price: ["null", "double"]; quantity: ["null", "int"]
    for column, flag in ((ITEM, HAS_ITEM), (CATEGORY, HAS_CATEGORY)):
        branch, pos = _branch(buf, pos, end)
        if pos < 0:
            return pos
        if branch == 1:
            value, pos = varint(buf, pos, end)
            if pos < 0:
                return pos
            longs[column] = value
        present[flag] = branch == 1
    branch, pos = _branch(buf, pos, end)
    if pos < 0:
        return pos
    if branch == 1:
        number, pos = _double(buf, pos, end, scratch)
        if pos < 0:
            return pos
        reals[PRICE] = number
    present[HAS_PRICE] = branch == 1
    branch, pos = _branch(buf, pos, end)
    if pos < 0:
        return pos
    if branch == 1:
        value, pos = varint(buf, pos, end)
        if pos < 0:
            return pos
        longs[QUANTITY] = value
    present[HAS_QUANTITY] = branch == 1
    for field in (CURRENCY, SEARCH_QUERY):  # ["null", "string"]
        branch, pos = _branch(buf, pos, end)
        if pos < 0:
            return pos
        if branch == 1:
            pos = _string(buf, pos, end, spans, field, chars)
            if pos < 0:
                return pos
    for field in (DEVICE_ID, IP, COUNTRY, USER_AGENT):
        pos = _string(buf, pos, end, spans, field, chars)
        if pos < 0:
            return pos
    branch, pos = _branch(buf, pos, end)  # payment_amount: ["null", "double"]
    if pos < 0:
        return pos
    if branch == 1:
        number, pos = _double(buf, pos, end, scratch)
        if pos < 0:
            return pos
        reals[AMOUNT] = number
    present[HAS_AMOUNT] = branch == 1
    branch, pos = _branch(buf, pos, end)  # payment_method: ["null", PaymentMethod]
    if pos < 0:
        return pos
    if branch == 1:
        value, pos = varint(buf, pos, end)
        if pos < 0:
            return pos
        if value < 0 or value >= _PAYMENT_METHODS:
            return -INVALID_INDEX
        longs[METHOD] = value
    for field in (CARD_FINGERPRINT, BILLING_COUNTRY):  # ["null", "string"]
        branch, pos = _branch(buf, pos, end)
        if pos < 0:
            return pos
        if branch == 1:
            pos = _string(buf, pos, end, spans, field, chars)
            if pos < 0:
                return pos
    while True:  # candidates: array of long, in blocks
        count, pos = varint(buf, pos, end)
        if pos < 0:
            return pos
        if count == 0:
            break
        if count < 0:
            return -MALFORMED  # a block with its byte size: the reference path reads it
        if count > end - pos:
            return -TRUNCATED  # each item takes at least one byte
        for _ in range(count):
            value, pos = varint(buf, pos, end)
            if pos < 0:
                return pos
            candidates[n_candidates] = value
            n_candidates += 1
    if pos != end:
        return -TRAILING
    return n_candidates


@kernel
def _validate(
    key: Bytes,
    key_null: bool,
    buf: Bytes,
    bounds: Int64s,
    window: Float64s,
    spans: Int64s,
    longs: Int64s,
    reals: Float64s,
    present: Bools,
    n_candidates: int,
    chars: Int64s,
) -> int:
    """OK, or the status of the first rule one decoded row breaks."""
    if key_null or len(key) == 0:
        return KEY_MISSING
    if spans[USER_ID, 1] == 0:
        return USER_ID_EMPTY
    if spans[EVENT_ID, 1] == 0:
        return EVENT_ID_EMPTY
    if len(key) != spans[USER_ID, 1]:
        return KEY_MISMATCH
    user = spans[USER_ID, 0]
    for k in range(len(key)):
        if key[k] != buf[user + k]:
            return KEY_MISMATCH
    for field in range(len(STRING_FIELDS)):
        if chars[field] > bounds[1]:
            return STRING_TOO_LONG
    code = _amount(present[HAS_PRICE], reals[PRICE], window[0], PRICE_NOT_FINITE)
    if code != OK:
        return code
    code = _amount(present[HAS_AMOUNT], reals[AMOUNT], window[0], AMOUNT_NOT_FINITE)
    if code != OK:
        return code
    if present[HAS_QUANTITY] and not 0 < longs[QUANTITY] <= bounds[2]:
        return QUANTITY_RANGE
    if longs[TIME] > window[1]:
        return TIME_FUTURE
    if longs[TIME] < window[2]:
        return TIME_TOO_OLD
    if n_candidates > bounds[3]:
        return TOO_MANY_CANDIDATES
    return OK


@kernel
def _amount(present: bool, value: float, limit: float, not_finite: int) -> int:
    """OK, or the first of not_finite, negative (+1), too_large (+2) that `value` breaks."""
    if not present:
        return OK
    if not np.isfinite(value):
        return not_finite
    if value < 0:
        return not_finite + 1
    if value > limit:
        return not_finite + 2
    return OK

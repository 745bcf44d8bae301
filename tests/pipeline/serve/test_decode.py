"""The columnar decoder against its oracle, fastavro plus `events.validate`."""

from __future__ import annotations

import io
import math
import struct

import fastavro
import pytest
from confluent_kafka import Message as KafkaMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from pipeline.serve import decode, spec
from pipeline.serve.decode import (
    OK,
    OTHER_SCHEMA,
    STATUS_KINDS,
    STRING_FIELDS,
    BatchDecoder,
    EventColumns,
)
from pipeline.serve.events import validate
from pipeline.settings import LimitSettings
from schemas.catalog import RegistryUnavailable, UnknownSchemaId, Writer, canonical
from schemas.codec import DecodeError, Decoder, Encoder
from tests.pipeline.sample import NOW_MS, click_record

LIMITS = LimitSettings(max_string_length=40, max_candidates=30)
ENCODER = Encoder(schemas.CLICK_EVENT)
REFERENCE = Decoder(schemas.CLICK_EVENT)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def Message(value: bytes | None, key: bytes | None, offset: int = 0) -> KafkaMessage:
    """A consumed message, as the consumer makes it (confluent-kafka's own constructor)."""
    return KafkaMessage(
        topic="clicks", partition=3, offset=offset, key=key, value=value, timestamp=(1, NOW_MS - 5)
    )


def oracle(value: bytes | None, key: bytes | None) -> dict[str, object] | DecodeError:
    try:
        if value is not None and len(value) > LIMITS.max_payload_bytes:
            raise DecodeError("decode.payload_too_large", "")
        record = REFERENCE.decode(value)
        validate(record, key, LIMITS, NOW_MS)
    except DecodeError as error:
        return error
    return record


def row_record(columns: EventColumns, row: int) -> dict[str, object]:
    """Row `row` of `columns` as the record fastavro would give."""
    record: dict[str, object] = {name: columns.text(row, i) for i, name in enumerate(STRING_FIELDS)}

    longs, reals, present = columns.longs[row], columns.reals[row], columns.present[row]

    def optional(value, flag):  # type: ignore[no-untyped-def]
        return value.item() if present[flag] else None

    method = int(longs[decode.METHOD])
    start, end = columns.candidate_start[row], columns.candidate_start[row + 1]
    record |= {
        "event_time": int(longs[decode.TIME]),
        "event_type": spec.EVENT_TYPES[longs[decode.TYPE]],
        "item_id": optional(longs[decode.ITEM], decode.HAS_ITEM),
        "category_id": optional(longs[decode.CATEGORY], decode.HAS_CATEGORY),
        "price": optional(reals[decode.PRICE], decode.HAS_PRICE),
        "quantity": optional(longs[decode.QUANTITY], decode.HAS_QUANTITY),
        "payment_amount": optional(reals[decode.AMOUNT], decode.HAS_AMOUNT),
        "payment_method": None if method < 0 else spec.PAYMENT_METHODS[method],
        "candidates": columns.candidates[start:end].tolist(),
    }
    return record


def same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


text = st.text(max_size=12) | st.sampled_from(["", "DE", "ü" * 40, "x" * 41, "😀" * 11])
maybe_text = st.none() | text
amount = st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 2e6)
records = st.fixed_dictionaries(
    {
        "event_id": text,
        "user_id": st.sampled_from(["u1", "u2", "", "ü-user"]),
        "session_id": text,
        "event_time": st.integers(NOW_MS - 40 * 86_400_000, NOW_MS + 3_600_000) | INT64,
        "event_type": st.sampled_from(spec.EVENT_TYPES),
        "item_id": st.none() | INT64,
        "category_id": st.none() | INT64,
        "price": amount,
        "quantity": st.none() | st.integers(-(2**31), 2**31 - 1),
        "currency": maybe_text,
        "search_query": maybe_text,
        "device_id": text,
        "ip": text,
        "country": text,
        "user_agent": text,
        "payment_amount": amount,
        "payment_method": st.none() | st.sampled_from(spec.PAYMENT_METHODS),
        "card_fingerprint": maybe_text,
        "billing_country": maybe_text,
        "candidates": st.lists(INT64, max_size=35),
    }
)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[bytes | None, bytes | None]:
    """A framed record, often damaged, with a key that mostly matches."""
    record = draw(records)
    value: bytes | None = ENCODER.encode(record)
    key: bytes | None = draw(
        st.sampled_from([record["user_id"].encode(), record["user_id"].encode(), b"other", None])
    )
    damage = draw(st.sampled_from(["none", "none", "flip", "cut", "append", "header", "null"]))
    assert value is not None
    if damage == "flip":
        at = draw(st.integers(0, len(value) - 1))
        value = value[:at] + bytes([draw(st.integers(0, 255))]) + value[at + 1 :]
    elif damage == "cut":
        value = value[: draw(st.integers(0, len(value) - 1))]
    elif damage == "append":
        value += draw(st.binary(min_size=1, max_size=4))
    elif damage == "header":
        value = struct.pack(">bI", draw(st.integers(-1, 1)), draw(st.integers(0, 6))) + value[5:]
    elif damage == "null":
        value = None
    return value, key


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(payloads(), min_size=1, max_size=8))
def test_columns_equal_the_oracle(batch):
    messages = [Message(value, key, offset) for offset, (value, key) in enumerate(batch)]
    columns, rejected = BatchDecoder(LIMITS).decode(messages, NOW_MS)
    refused = {r.row: r for r in rejected}
    for row, (value, key) in enumerate(batch):
        expected = oracle(value, key)
        if isinstance(expected, DecodeError):
            assert row in refused, f"kernel accepted what the oracle refuses: {expected}"
            assert refused[row].kind == expected.kind
            assert (refused[row].partition, refused[row].offset) == (3, row)
            if " at 0x" not in expected.message:  # fastavro names its BytesIO object
                assert refused[row].detail == expected.message
            continue
        assert row not in refused
        assert columns.status[row] == OK
        decoded = row_record(columns, row)
        assert decoded.keys() == expected.keys()
        for name, want in expected.items():
            assert same(decoded[name], want), (name, decoded[name], want)
    assert columns.offset.tolist() == list(range(len(batch)))
    assert set(columns.partition.tolist()) == {3}
    assert set(columns.ingest_time.tolist()) == {NOW_MS - 5}


@settings(max_examples=200, deadline=None)
@given(records)
def test_valid_records_take_the_compiled_path(record):
    """Every record the oracle accepts in the reader schema is decoded by the kernel itself,
    not by the fallback (which would keep the results right but the path slow).
    """
    value = ENCODER.encode(record)
    key = record["user_id"].encode()
    columns, rejected = BatchDecoder(LIMITS).decode([Message(value, key)], NOW_MS)
    expected = oracle(value, key)
    if isinstance(expected, DecodeError):
        assert STATUS_KINDS[columns.status[0]] == expected.kind
    else:
        assert columns.status[0] == OK and not rejected


def test_other_writer_schema_is_resolved_by_the_reference_path(monkeypatch):
    """A payload under a second known id for ClickEvent (an older writer version) is resolved
    by fastavro and then decoded in the reader schema like any other row.
    """
    monkeypatch.setitem(schemas.CATALOG, 6, schemas.CLICK_EVENT)
    schemas.by_id.cache_clear()
    try:
        decoder = BatchDecoder(LIMITS)
        record = click_record(candidates=[7, 8], payment_method="wallet", user_agent="agent")
        own = ENCODER.encode(record)
        other = own[:1] + struct.pack(">I", 6) + own[5:]
        columns, rejected = decoder.decode([Message(other, b"u1"), Message(own, b"u1", 1)], NOW_MS)
    finally:
        schemas.by_id.cache_clear()
    assert not rejected
    assert row_record(columns, 0) == record == row_record(columns, 1)
    assert OTHER_SCHEMA != OK


def test_an_empty_batch():
    columns, rejected = BatchDecoder(LIMITS).decode([], NOW_MS)
    assert len(columns) == 0 and rejected == []
    assert columns.candidate_start.tolist() == [0]


class FakeCatalog:
    """Registry ids as a dict: 40 and 41 are the reader schema (two subjects), 42 a newer
    writer with one more field, and 43 a registry that does not answer.
    """

    def __init__(self) -> None:
        reader = schemas.raw(schemas.CLICK_EVENT)
        newer = dict(reader, fields=[*reader["fields"], {"name": "referrer", "type": "string"}])
        self.schemas = {40: reader, 41: reader, 42: newer}

    def output_id(self, name: str) -> int:
        raise KeyError(name)

    def writer(self, schema_id: int) -> Writer:
        if schema_id == 43:
            raise RegistryUnavailable("timeout", "no answer")
        if schema_id not in self.schemas:
            raise UnknownSchemaId(f"{schema_id}")
        schema = self.schemas[schema_id]
        return Writer(schema_id, schemas.parse(schema), canonical(schema))

    def describe(self) -> dict[str, object]:
        return {}


def framed(schema_id: int, record: dict[str, object], schema: dict[str, object]) -> bytes:
    body = io.BytesIO()
    body.write(struct.pack(">bI", 0, schema_id))
    fastavro.schemaless_writer(body, schemas.parse(schema), record)
    return body.getvalue()


def test_registry_ids_of_the_reader_schema_are_learned_and_others_resolved():
    catalog = FakeCatalog()
    decoder = BatchDecoder(LimitSettings(), catalog)
    record = click_record(candidates=[3])
    newer = dict(record, referrer="r")
    batch = [
        Message(framed(40, record, catalog.schemas[40]), b"u1"),
        Message(framed(42, newer, catalog.schemas[42]), b"u1", 1),
        Message(framed(44, record, catalog.schemas[40]), b"u1", 2),
        Message(framed(41, record, catalog.schemas[41]), b"u1", 3),
    ]
    columns, rejected = decoder.decode(batch, NOW_MS)
    assert [(r.row, r.kind) for r in rejected] == [(2, "decode.unknown_schema_id")]
    assert row_record(columns, 0) == record == row_record(columns, 1) == row_record(columns, 3)
    # 40 and 41 write the reader schema: the kernel takes them from now on; 42 never.
    assert sorted(decoder._reader_ids.tolist()) == [40, 41]
    again, _ = decoder.decode(batch[:1] + batch[3:], NOW_MS)
    assert again.status.tolist() == [OK, OK]


def test_a_registry_that_does_not_answer_is_raised_not_dead_lettered():
    catalog = FakeCatalog()
    decoder = BatchDecoder(LimitSettings(), catalog)
    record = click_record()
    batch = [
        Message(framed(40, record, catalog.schemas[40]), b"u1"),
        Message(framed(43, record, catalog.schemas[40]), b"u1", 1),
    ]
    with pytest.raises(RegistryUnavailable, match="timeout"):
        decoder.decode(batch, NOW_MS)

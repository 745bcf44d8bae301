import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import schemas
from pipeline.codec import DecodeError, Decoder, Encoder
from tests.pipeline.sample import click_record

ENCODER = Encoder(schemas.CLICK_EVENT)
DECODER = Decoder(schemas.CLICK_EVENT)


def test_round_trip():
    record = click_record(candidates=[1, 2, 3], payment_method="card")
    assert DECODER.decode(ENCODER.encode(record)) == record


def test_header_is_confluent_wire_format():
    payload = ENCODER.encode(click_record())
    assert payload[0] == 0
    assert struct.unpack(">I", payload[1:5])[0] == schemas.CURRENT_ID[schemas.CLICK_EVENT]


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"", "decode.empty_payload"),
        (None, "decode.empty_payload"),
        (b"\x00\x00", "decode.truncated"),
        (b"\x05\x00\x00\x00\x01abc", "decode.bad_magic_byte"),
        (b"\x00\x00\x00\x03\xe7abc", "decode.unknown_schema_id"),
        (b"\x00\x00\x00\x00\x02abc", "decode.unknown_schema_id"),  # a FraudScore id on the input
    ],
)
def test_bad_framing_has_its_reason(payload, kind):
    with pytest.raises(DecodeError) as error:
        DECODER.decode(payload)
    assert error.value.kind == kind


def test_truncated_body():
    payload = ENCODER.encode(click_record())
    with pytest.raises(DecodeError) as error:
        DECODER.decode(payload[:-4])
    assert error.value.kind == "decode.truncated"


def test_trailing_bytes():
    with pytest.raises(DecodeError) as error:
        DECODER.decode(ENCODER.encode(click_record()) + b"xx")
    assert error.value.kind == "decode.trailing_bytes"


def test_unknown_enum_symbol_index():
    payload = bytearray(ENCODER.encode(click_record(event_id="e", user_id="u", session_id="s")))
    # header(5) + "e"(2) + "u"(2) + "s"(2) + event_time long: find the enum byte after it.
    position = 5 + 2 + 2 + 2
    while payload[position] & 0x80:
        position += 1
    payload[position + 1] = 0x7E  # zig-zag 63: far past the last symbol
    with pytest.raises(DecodeError) as error:
        DECODER.decode(bytes(payload))
    assert error.value.kind == "decode.invalid_index"


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_fail_with_a_reason(payload):
    try:
        DECODER.decode(payload)
    except DecodeError as error:
        assert error.kind.startswith("decode.")


LONGS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TEXT = st.text(max_size=40)
DOUBLES = st.floats(allow_nan=False, width=64)


def _fastavro_bytes(name: str, record: dict) -> bytes:
    import io

    from fastavro import schemaless_writer

    schema = schemas.load(name)
    buffer = io.BytesIO()
    buffer.write(struct.pack(">bI", 0, schema.schema_id))
    schemaless_writer(buffer, schema.parsed, record)
    return buffer.getvalue()


@given(
    st.fixed_dictionaries(
        {
            "event_id": TEXT,
            "user_id": TEXT,
            "event_time": LONGS,
            "score": DOUBLES,
            "decision": st.sampled_from(["allow", "review", "block"]),
            "reasons": st.lists(
                st.fixed_dictionaries({"feature": TEXT, "contribution": DOUBLES}), max_size=4
            ),
            "model_name": TEXT,
            "model_version": TEXT,
            "ingest_time": LONGS,
            "scored_time": LONGS,
        }
    )
)
def test_hand_written_fraud_score_writer_matches_fastavro(record):
    encoder = Encoder(schemas.FRAUD_SCORE)
    assert encoder._fast is not None  # the fast path is the one under test
    assert encoder.encode(record) == _fastavro_bytes(schemas.FRAUD_SCORE, record)


@given(
    st.fixed_dictionaries(
        {
            "event_id": TEXT,
            "user_id": TEXT,
            "event_time": LONGS,
            "items": st.lists(
                st.fixed_dictionaries({"item_id": LONGS, "score": DOUBLES}), max_size=25
            ),
            "model_name": TEXT,
            "model_version": TEXT,
            "ingest_time": LONGS,
            "scored_time": LONGS,
        }
    )
)
def test_hand_written_recommendation_writer_matches_fastavro(record):
    encoder = Encoder(schemas.RECOMMENDATION)
    assert encoder._fast is not None
    assert encoder.encode(record) == _fastavro_bytes(schemas.RECOMMENDATION, record)

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import schemas
from schemas.codec import DecodeError, Decoder, Encoder
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
        # A FraudScore id on the input: a writer that cannot be read as a ClickEvent.
        (b"\x00\x00\x00\x00\x02abc", "decode.incompatible_schema"),
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

"""The bench probe's FraudScore walk against fastavro's decode, its oracle."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from pipeline.tools.bench.probe import ingest_times
from schemas.codec import DecodeError, Decoder, Encoder

LONGS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
ENCODER = Encoder(schemas.FRAUD_SCORE)
DECODER = Decoder(schemas.FRAUD_SCORE)


class Unused:
    """A decoder for records the walk must read itself."""

    def decode(self, value: bytes) -> None:
        raise AssertionError(f"the walk fell back to decoding {value!r}")


fraud_scores = st.fixed_dictionaries(
    {
        "event_id": st.text(max_size=40),
        "user_id": st.text(max_size=70),  # unicode, empty, longer than one varint byte
        "event_time": LONGS,
        "score": st.floats(allow_nan=False),
        "decision": st.sampled_from(["allow", "review", "block"]),
        "reasons": st.lists(
            st.fixed_dictionaries(
                {"feature": st.text(max_size=30), "contribution": st.floats(allow_nan=False)}
            ),
            max_size=70,  # past 63 items the count takes two varint bytes
        ),
        "model_name": st.text(max_size=20),
        "model_version": st.text(max_size=10),
        "ingest_time": LONGS,
        "scored_time": LONGS,
    }
)


@settings(max_examples=200, deadline=None)
@given(records=st.lists(fraud_scores, min_size=1, max_size=8))
def test_the_walk_reads_the_ingest_time_fastavro_decodes(records: list[dict[str, object]]) -> None:
    values = [ENCODER.encode(record) for record in records]
    expected = [float(DECODER.decode(value)["ingest_time"]) for value in values]
    assert ingest_times(values, Unused()) == expected


def test_a_record_the_walk_cannot_read_goes_to_the_decoder() -> None:
    record = {
        "event_id": "e1",
        "user_id": "u1",
        "event_time": 1,
        "score": 0.5,
        "decision": "allow",
        "reasons": [{"feature": "price_log", "contribution": 0.1}],
        "model_name": "fraud",
        "model_version": "1",
        "ingest_time": 1_700_000_000_000,
        "scored_time": 2,
    }
    value = ENCODER.encode(record)
    with pytest.raises(DecodeError):  # cut inside ingest_time: fastavro's verdict
        ingest_times([value, value[:-3]], DECODER)
    # A block of items with its size in bytes (a negative count), which fastavro reads
    # and does not write: the walk reads it too.
    reasons_at = value.index(b"\x02\x12price_log")  # a count of one, then its name
    item = 1 + len("price_log") + 8  # the name's length, the name, the double
    sized = value[:reasons_at] + b"\x01" + bytes([2 * item]) + value[reasons_at + 1 :]
    assert DECODER.decode(sized)["ingest_time"] == record["ingest_time"]
    assert ingest_times([sized], Unused()) == [float(record["ingest_time"])]

import io

from fastavro import parse_schema, schemaless_reader, schemaless_writer

import schemas


def test_every_catalog_entry_parses_and_has_its_name():
    for schema_id, stem in schemas.CATALOG.items():
        schema = schemas.by_id(schema_id)
        assert schema is not None and schema.name == stem
    assert schemas.by_id(999) is None


def test_every_nullable_field_defaults_to_null():
    for stem in schemas.CATALOG.values():
        for field in schemas.raw(stem)["fields"]:
            if isinstance(field["type"], list) and "null" in field["type"]:
                assert field.get("default", "missing") is None, (stem, field["name"])


def test_adding_an_optional_field_is_backward_compatible():
    old = schemas.raw(schemas.FRAUD_LABEL)
    new = {
        **old,
        "fields": [*old["fields"], {"name": "note", "type": ["null", "string"], "default": None}],
    }
    buffer = io.BytesIO()
    schemaless_writer(
        buffer, parse_schema(old), {"event_id": "e1", "is_fraud": True, "pattern": "bot"}
    )
    buffer.seek(0)
    record = schemaless_reader(buffer, parse_schema(old), parse_schema(new))
    assert record == {"event_id": "e1", "is_fraud": True, "pattern": "bot", "note": None}


def test_timestamps_stay_integers_at_runtime():
    parsed = schemas.load(schemas.CLICK_EVENT).parsed
    assert "logicalType" not in str(parsed)
    assert "timestamp-millis" in str(schemas.raw(schemas.CLICK_EVENT))


def test_a_dead_letter_written_before_payload_hash_reads_with_todays_schema():
    old = schemas.by_id(4)
    assert old is not None and old.name == "dead_letter.v1"
    assert schemas.load(schemas.DEAD_LETTER).schema_id == 6
    record = {
        "original_key": b"u",
        "original_value": b"\x00",
        "source_topic": "t",
        "source_partition": 0,
        "source_offset": 3,
        "error_kind": "decode.truncated",
        "error_message": "",
        "failed_time": 1,
    }
    buffer = io.BytesIO()
    schemaless_writer(buffer, old.parsed, record)
    buffer.seek(0)
    read = schemaless_reader(buffer, old.parsed, schemas.load(schemas.DEAD_LETTER).parsed)
    assert read == {**record, "payload_hash": None}

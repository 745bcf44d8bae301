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

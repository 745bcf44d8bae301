"""Avro in and out: Confluent wire framing, schema resolution, and decode errors as data.

The framing (magic byte 0, 4-byte big-endian schema id) is written by hand rather than with
`confluent_kafka.schema_registry`'s serializers: the id comes from a catalog (the registry's,
looked up once at start, or the static one), and five bytes of `struct` cost less than a
serializer call per message. The bytes are the same as the serializers' (the registry tests
read them with `AvroDeserializer`).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError

import schemas
from schemas.catalog import Catalog, StaticCatalog, UnknownSchemaId, canonical
from schemas.errors import StreamscoreError

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")


class DecodeError(StreamscoreError):
    """Why a payload could not be decoded; `kind` is a stable reason code."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class Encoder:
    """Encodes records of one schema with the wire header."""

    def __init__(self, schema_name: str, schema_id: int | None = None) -> None:
        """Frame with `schema_id` (the static catalog's id by default)."""
        schema = schemas.load(schema_name)
        self._parsed = schema.parsed
        self.schema_id = schema.schema_id if schema_id is None else schema_id
        self._header = _HEADER.pack(MAGIC_BYTE, self.schema_id)

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """`record` as framed Avro bytes (fastavro: the reference the output kernel in
        `pipeline.serve.encode` is tested against, and the writer of dead letters).
        """
        buffer = io.BytesIO()
        buffer.write(self._header)
        schemaless_writer(buffer, self._parsed, record)
        return buffer.getvalue()


class Decoder:
    """Decodes framed Avro into the reader's (newest) schema of one record type.

    Writer schemas come from `catalog` by id, once each. A registry that does not answer
    raises `schemas.registry.RegistryUnavailable`: not a verdict on the payload.
    """

    def __init__(self, schema_name: str, catalog: Catalog | None = None) -> None:
        """Read records of `schema_name`; writer ids are looked up in `catalog` (default:
        the static catalog).
        """
        self._reader = schemas.load(schema_name)
        self._canonical = canonical(schemas.raw(schema_name))
        self._catalog = catalog if catalog is not None else StaticCatalog()
        # Per writer id, the reader schema to resolve into; None for a writer equal to the
        # reader, which fastavro then reads without resolution (a third faster).
        self._writers: dict[int, tuple[Any, Any]] = {}

    def writes_reader_schema(self, schema_id: int) -> bool:
        """Whether the writer under `schema_id` is the reader schema itself (False for an
        unknown id). May raise RegistryUnavailable.
        """
        try:
            return self._writer(schema_id)[1] is None
        except DecodeError:
            return False

    def decode(self, payload: bytes | None) -> dict[str, Any]:
        """The record in `payload`; raise DecodeError with the reason otherwise."""
        if not payload:
            raise DecodeError("decode.empty_payload", "message has no value")
        if len(payload) < _HEADER.size:
            raise DecodeError(
                "decode.truncated", f"{len(payload)} bytes is shorter than the header"
            )
        magic, schema_id = _HEADER.unpack_from(payload)
        if magic != MAGIC_BYTE:
            raise DecodeError("decode.bad_magic_byte", f"magic byte {magic}, expected {MAGIC_BYTE}")
        writer, reader = self._writer(schema_id)
        body = io.BytesIO(payload)
        body.seek(_HEADER.size)
        record = _read(body, writer, reader)
        if body.tell() != len(payload):
            raise DecodeError(
                "decode.trailing_bytes", f"{len(payload) - body.tell()} bytes after the record"
            )
        return record

    def _writer(self, schema_id: int) -> tuple[Any, Any]:
        found = self._writers.get(schema_id)
        if found is None:
            try:
                writer = self._catalog.writer(schema_id)
            except UnknownSchemaId as exc:
                raise DecodeError("decode.unknown_schema_id", str(exc)) from exc
            same = writer.canonical == self._canonical
            found = (writer.parsed, None if same else self._reader.parsed)
            self._writers[schema_id] = found
        return found


def _read(body: io.BytesIO, writer: Any, reader: Any) -> dict[str, Any]:
    # Untrusted bytes can fail anywhere inside fastavro; each failure class gets its own reason.
    try:
        record = schemaless_reader(body, writer, reader)
    except SchemaResolutionError as exc:
        raise DecodeError("decode.incompatible_schema", str(exc)) from exc
    except EOFError as exc:
        raise DecodeError("decode.truncated", str(exc) or "payload ends inside a record") from exc
    except IndexError as exc:
        raise DecodeError(
            "decode.invalid_index", "enum symbol or union branch out of range"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DecodeError("decode.invalid_utf8", str(exc)) from exc
    except Exception as exc:
        raise DecodeError("decode.malformed", f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(record, dict):
        raise DecodeError("decode.malformed", "payload is not a record")
    return record

"""Avro in and out: Confluent wire framing, schema resolution, and decode errors as data.

The framing (magic byte 0, 4-byte big-endian schema id) is written by hand rather than with
`confluent_kafka.schema_registry` because no registry runs here: ids come from the fixed
catalog in `schemas`, and five bytes of `struct` cost less than a registry client per message.
"""

from __future__ import annotations

import io
import struct
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

import schemas

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")


class DecodeError(Exception):
    """Why a payload could not be decoded; `kind` is a stable reason code."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class Encoder:
    """Encodes records of one schema with the wire header."""

    def __init__(self, schema_name: str) -> None:
        schema = schemas.load(schema_name)
        self._parsed = schema.parsed
        self._header = _HEADER.pack(MAGIC_BYTE, schema.schema_id)

    def encode(self, record: dict[str, Any]) -> bytes:
        """`record` as framed Avro bytes (fastavro: the reference the output kernel in
        `pipeline.encode` is tested against, and the writer of dead letters).
        """
        buffer = io.BytesIO()
        buffer.write(self._header)
        schemaless_writer(buffer, self._parsed, record)
        return buffer.getvalue()


class Decoder:
    """Decodes framed Avro into the reader's (newest) schema of one record type."""

    def __init__(self, schema_name: str) -> None:
        self._reader = schemas.load(schema_name)
        # Per writer id, the reader schema to resolve into; None for the reader's own id,
        # which fastavro then reads without resolution (a third faster).
        self._writers: dict[int, tuple[Any, Any]] = {}
        for schema_id, stem in schemas.CATALOG.items():
            writer = schemas.by_id(schema_id)
            if stem.split(".")[0] == schema_name and writer is not None:
                same = schema_id == self._reader.schema_id
                self._writers[schema_id] = (writer.parsed, None if same else self._reader.parsed)

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
        schemas_ = self._writers.get(schema_id)
        if schemas_ is None:
            raise DecodeError("decode.unknown_schema_id", f"schema id {schema_id} is not known")
        body = io.BytesIO(payload)
        body.seek(_HEADER.size)
        record = _read(body, *schemas_)
        if body.tell() != len(payload):
            raise DecodeError(
                "decode.trailing_bytes", f"{len(payload) - body.tell()} bytes after the record"
            )
        return record


def _read(body: io.BytesIO, writer: Any, reader: Any) -> dict[str, Any]:
    # Untrusted bytes can fail anywhere inside fastavro; each failure class gets its own reason.
    try:
        record = schemaless_reader(body, writer, reader)
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

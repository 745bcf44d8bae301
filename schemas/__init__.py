"""Avro schemas of streamscore's topics, and the fixed catalog of the static mode.

Messages use the Confluent wire format (magic byte 0, a 4-byte big-endian schema id, then the
Avro body). With a schema registry (`schemas.registry`, the default) the registry assigns the
ids. Without one (the static mode) they come from the fixed catalog below: a new schema
version is a new `.avsc` file with a new id. Either way a reader resolves a known writer id
against its own (newest) schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from fastavro import parse_schema

CLICK_EVENT = "click_event"
FRAUD_SCORE = "fraud_score"
RECOMMENDATION = "recommendation"
DEAD_LETTER = "dead_letter"
FRAUD_LABEL = "fraud_label"
MODEL_QUALITY = "model_quality"
INPUT_HISTOGRAM = "input_histogram"

# Wire id -> schema file stem. Ids are never reused; append new versions at the end. The
# newest version of a schema is `<name>.avsc`; an older one, kept so its records can still
# be read, is `<name>.v<N>.avsc`.
CATALOG: dict[int, str] = {
    1: CLICK_EVENT,
    2: FRAUD_SCORE,
    3: RECOMMENDATION,
    4: f"{DEAD_LETTER}.v1",
    5: FRAUD_LABEL,
    6: DEAD_LETTER,  # v2: payload_hash, for the redact mode
    7: MODEL_QUALITY,
    8: INPUT_HISTOGRAM,
}
# The id each schema name is written with today (its newest version).
CURRENT_ID: dict[str, int] = {
    stem: wire_id for wire_id, stem in CATALOG.items() if ".v" not in stem
}


@dataclass(frozen=True, slots=True)
class Schema:
    """A parsed schema with its wire id."""

    name: str
    schema_id: int
    parsed: Any


def raw(name: str) -> dict[str, Any]:
    """The schema file `name`.avsc as JSON."""
    text = resources.files(__package__).joinpath(f"{name}.avsc").read_text(encoding="utf-8")
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def _without_logical_types(node: Any) -> Any:
    """`node` with every logicalType removed: timestamps stay epoch-millisecond ints.

    The bytes on the wire are the same; without this fastavro would build a datetime for
    every timestamp it reads, which costs more than the rest of the decode.
    """
    if isinstance(node, dict):
        return {
            key: _without_logical_types(value)
            for key, value in node.items()
            if key != "logicalType"
        }
    if isinstance(node, list):
        return [_without_logical_types(item) for item in node]
    return node


def parse(schema: dict[str, Any]) -> Any:
    """`schema` (JSON) parsed for fastavro, timestamps kept as epoch-millisecond ints."""
    return parse_schema(_without_logical_types(schema))


def _parse(stem: str) -> Any:
    return parse(raw(stem))


@cache
def load(name: str) -> Schema:
    """The newest version of schema `name`, parsed for fastavro."""
    return Schema(name=name, schema_id=CURRENT_ID[name], parsed=_parse(name))


@cache
def by_id(schema_id: int) -> Schema | None:
    """The schema written under wire id `schema_id`, or None when the id is unknown."""
    stem = CATALOG.get(schema_id)
    if stem is None:
        return None
    return Schema(name=stem, schema_id=schema_id, parsed=_parse(stem))

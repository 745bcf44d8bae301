"""Where wire ids come from, as one interface: the fixed catalog of the static mode here,
and a Confluent-compatible registry in `schemas.registry`.

A catalog answers two questions: which id an output record is framed with (`output_id`),
and which writer schema a consumed id stands for (`writer`). This module imports no HTTP
client, so what only reads the static ids (the bench's peer) does not need one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fastavro.schema import to_parsing_canonical_form

from schemas import CATALOG, CURRENT_ID, by_id, raw
from schemas.errors import StreamscoreError


class UnknownSchemaId(StreamscoreError, LookupError):
    """The registry (or the static catalog) has no schema under this id."""


class RegistryUnavailable(StreamscoreError, RuntimeError):
    """The registry did not answer usefully; `cause` is a short label for metrics. Never a
    verdict on the input: the pipeline holds the input until the registry answers.
    """

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"schema registry unavailable ({cause}): {detail}")
        self.cause = cause


class IncompatibleSchema(StreamscoreError, ValueError):
    """The registry refused a schema under its subject's compatibility rule."""


@dataclass(frozen=True, slots=True)
class Writer:
    """A writer schema: parsed for fastavro, and its parsing canonical form (two schemas
    with equal forms write the same bytes).
    """

    schema_id: int
    parsed: Any
    canonical: str


def canonical(schema: Mapping[str, Any]) -> str:
    """The Avro parsing canonical form of a schema given as JSON."""
    return str(to_parsing_canonical_form(dict(schema)))


def subject(topic: str) -> str:
    """The value subject of `topic` under TopicNameStrategy."""
    return f"{topic}-value"


class Catalog(Protocol):
    """What the codecs need from a source of wire ids."""

    def output_id(self, name: str) -> int:
        """The id records of schema `name` are framed with."""
        ...

    def writer(self, schema_id: int) -> Writer:
        """The writer schema under `schema_id`: UnknownSchemaId when there is none,
        RegistryUnavailable when that cannot be told now.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """For summaries and logs (no secrets)."""
        ...


class StaticCatalog:
    """The fixed catalog of `schemas`: for a deployment without a registry."""

    def output_id(self, name: str) -> int:
        """The id records of schema `name` are framed with."""
        return CURRENT_ID[name]

    def writer(self, schema_id: int) -> Writer:
        """The writer schema under `schema_id`; UnknownSchemaId when there is none."""
        schema = by_id(schema_id)
        if schema is None:
            raise UnknownSchemaId(f"schema id {schema_id} is not in the static catalog")
        return Writer(schema_id, schema.parsed, canonical(raw(schema.name)))

    def describe(self) -> dict[str, Any]:
        """For summaries: the mode and the ids."""
        return {"mode": "static", "ids": {name: i for i, name in CATALOG.items()}}

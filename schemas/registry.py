"""A Confluent-compatible schema registry as the source of wire ids (Confluent, Apicurio's
ccompat API, Karapace), through `confluent_kafka.schema_registry`.

The registry catalog registers the output schemas under TopicNameStrategy subjects
(`<topic>-value`) with the configured compatibility, and fetches each writer schema once by
id (the client caches them too). A registry that does not answer raises
`RegistryUnavailable`, which is never a verdict on the input.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from confluent_kafka.schema_registry import Schema as RegistrySchema
from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError

# The client's transport is httpx or, on Python 3.10+, its fork httpx2; this shim names
# whichever the client itself uses, so its network errors are the ones caught here.
from confluent_kafka.schema_registry.common._httpx_compat import httpx
from confluent_kafka.schema_registry.schema_registry_client import (
    ConfigCompatibilityLevel,
    ServerConfig,
)

from schemas import parse, raw
from schemas.catalog import (
    IncompatibleSchema,
    RegistryUnavailable,
    UnknownSchemaId,
    Writer,
    canonical,
    subject,
)

_NOT_FOUND = 404
# Statuses that say the registry, not the request, is at fault (or busy): wait and retry.
_TRANSIENT = {408, 429, 500, 502, 503, 504}
_UNAUTHORISED = {401, 403}
# An id the registry did not have is asked again after this long (it may be registered
# since), and at most this many are remembered.
_UNKNOWN_TTL_S = 60.0
_UNKNOWN_MAX = 10_000


class RegistryCatalog:
    """A Confluent-compatible registry (Confluent, Apicurio's ccompat API, Karapace)."""

    def __init__(
        self,
        client_config: Mapping[str, Any],
        outputs: Mapping[str, str],
        compatibility: str = "BACKWARD",
    ) -> None:
        """Talk to the registry of `client_config`; `outputs` maps each topic this process
        writes to its schema's name. Nothing is sent before `register_outputs`.
        """
        self.url = str(client_config["url"])
        self._client = SchemaRegistryClient(dict(client_config))
        self._outputs = dict(outputs)
        self._compatibility = compatibility
        self._ids: dict[str, int] = {}
        self._writers: dict[int, Writer] = {}
        # Ids the registry said it does not have, until when (monotonic s): input that keeps
        # naming a foreign id must not cost a request per message.
        self._unknown: dict[int, float] = {}

    def register_outputs(self) -> dict[str, int]:
        """Set each output subject's compatibility and register the output schemas; their
        ids frame what this process writes. IncompatibleSchema names a refused subject.
        """
        for topic, name in self._outputs.items():
            schema_id = self.register(name, subject(topic))
            # One schema on several topics (FraudScore: served and shadow) is framed with one
            # id; a registry that gives equal schemas one id per content (Confluent,
            # Apicurio's ccompat API) does.
            if self._ids.setdefault(name, schema_id) != schema_id:
                raise IncompatibleSchema(
                    f"{name} got ids {self._ids[name]} and {schema_id} under two subjects "
                    f"(the second {subject(topic)!r}): its records need one"
                )
        return dict(self._ids)

    def register(
        self, name: str, subject_name: str, schema: Mapping[str, Any] | None = None
    ) -> int:
        """Register `schema` (default: the `name`.avsc file) under `subject_name`, first
        setting the subject's compatibility; its id (the existing one when already there).
        """
        text = json.dumps(schema if schema is not None else raw(name))
        try:
            level = ConfigCompatibilityLevel(self._compatibility)
            self._client.set_config(subject_name, ServerConfig(compatibility=level))
            return int(self._client.register_schema(subject_name, RegistrySchema(text, "AVRO")))
        except SchemaRegistryError as exc:
            if exc.http_status_code in (409, 422):
                raise IncompatibleSchema(
                    f"the registry refused {name} under subject {subject_name!r} "
                    f"({self._compatibility}): {exc.error_message}"
                ) from exc
            raise _unavailable(exc) from exc
        except httpx.TransportError as exc:
            raise _unavailable(exc) from exc

    def check(self, subject_name: str, schema: Mapping[str, Any]) -> bool:
        """Whether `schema` may be registered under `subject_name` (True for a subject
        that has no version yet).
        """
        try:
            if not self._client.get_versions(subject_name):
                return True
        except SchemaRegistryError as exc:
            if exc.http_status_code != _NOT_FOUND:
                raise _unavailable(exc) from exc
            return True
        except httpx.TransportError as exc:
            raise _unavailable(exc) from exc
        try:
            compatible = self._client.test_compatibility(
                subject_name, RegistrySchema(json.dumps(schema), "AVRO")
            )
        except SchemaRegistryError as exc:
            if exc.http_status_code in (409, 422):
                return False
            raise _unavailable(exc) from exc
        except httpx.TransportError as exc:
            raise _unavailable(exc) from exc
        return bool(compatible)

    def subjects(self) -> dict[str, list[tuple[int, int]]]:
        """Every subject with its (version, id) pairs."""
        try:
            found: dict[str, list[tuple[int, int]]] = {}
            for name in self._client.get_subjects():
                versions = []
                for version in self._client.get_versions(name):
                    registered = self._client.get_version(name, version)
                    versions.append((int(version), int(registered.schema_id or 0)))
                found[name] = versions
            return found
        except (SchemaRegistryError, httpx.TransportError) as exc:
            raise _unavailable(exc) from exc

    def output_id(self, name: str) -> int:
        """The id records of schema `name` are framed with (after `register_outputs`)."""
        try:
            return self._ids[name]
        except KeyError:
            raise KeyError(f"{name} is not an output registered by this process") from None

    def writer(self, schema_id: int) -> Writer:
        """The writer schema under `schema_id`, fetched once; UnknownSchemaId for an id the
        registry does not know, RegistryUnavailable when it does not answer.
        """
        writer = self._writers.get(schema_id)
        if writer is not None:
            return writer
        if self._unknown.get(schema_id, 0.0) > time.monotonic():
            raise UnknownSchemaId(f"schema id {schema_id} is not in the registry")
        try:
            found = self._client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == _NOT_FOUND:
                if len(self._unknown) >= _UNKNOWN_MAX:
                    self._unknown.clear()
                self._unknown[schema_id] = time.monotonic() + _UNKNOWN_TTL_S
                raise UnknownSchemaId(f"schema id {schema_id} is not in the registry") from exc
            raise _unavailable(exc) from exc
        except httpx.TransportError as exc:
            raise _unavailable(exc) from exc
        if (found.schema_type or "AVRO") != "AVRO" or found.schema_str is None:
            raise UnknownSchemaId(f"schema id {schema_id} is {found.schema_type}, not Avro")
        text = json.loads(found.schema_str)
        if not isinstance(text, dict):  # a bare primitive or union cannot be an event
            raise UnknownSchemaId(f"schema id {schema_id} is not an Avro record")
        writer = Writer(schema_id, parse(text), canonical(text))
        self._writers[schema_id] = writer
        return writer

    def ping(self) -> None:
        """Raise RegistryUnavailable unless the registry answers a cheap request."""
        try:
            self._client.get_subjects()
        except (SchemaRegistryError, httpx.TransportError) as exc:
            raise _unavailable(exc) from exc

    def describe(self) -> dict[str, Any]:
        """For summaries and logs: the URL (without any credentials in it) and the ids."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        url = urlunsplit(parts._replace(netloc=netloc))
        return {"mode": "registry", "url": url, "ids": dict(self._ids)}


def _unavailable(exc: Exception) -> RegistryUnavailable:
    if isinstance(exc, SchemaRegistryError):
        status = exc.http_status_code
        if status in _UNAUTHORISED:
            cause = "unauthorised"
        elif status in _TRANSIENT:
            cause = "server_error"
        else:
            cause = f"http_{status}"
        return RegistryUnavailable(cause, str(exc))
    if isinstance(exc, httpx.TimeoutException):
        return RegistryUnavailable("timeout", type(exc).__name__)
    return RegistryUnavailable("unreachable", f"{type(exc).__name__}: {exc}")

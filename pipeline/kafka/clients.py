"""Client configurations of the pipeline: librdkafka's consumer and producer, and the schema
catalog (a registry, or the static catalog) that frames and resolves their records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from pipeline.settings import ConsumerSettings, KafkaSettings, SchemaRegistrySettings
from schemas.catalog import Catalog, RegistryUnavailable, StaticCatalog
from schemas.registry import RegistryCatalog

# `fetch.queue.backoff.ms` of every consumer that reads a backlog: once more is fetched
# than consumed (queued.max.messages.kbytes, 64 MB), librdkafka postpones the partitions'
# next fetch by this much, 1 s by default, so the reader drained its queue and waited. A
# bare consumer of 1,000,000 bench events read 158k events/s at the default, 1.49M at 10
# ms (132k against 276-280k with 3 µs of work an event, at 10-100 ms); the changelog
# restore, 139k against 215k records/s in the state bench.
FETCH_QUEUE_BACKOFF_MS = 10
# The pipeline producer's `linger.ms`: under load, a batch's records and the next batch's
# share requests. With the input idle, at-least-once sends at once instead (`Sink.send_now`):
# a micro-batch's records are queued together, so waiting adds latency and saves nothing.
LINGER_MS = 2


def consumer_config(
    kafka: KafkaSettings, consumer: ConsumerSettings
) -> dict[str, str | int | float | bool]:
    """The pipeline's consumer: offsets are committed by the checkpoint, never
    automatically; read_committed.
    """
    return (
        kafka.client_config()
        | {
            "group.id": consumer.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": consumer.auto_offset_reset,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": consumer.session_timeout_ms,
            "heartbeat.interval.ms": consumer.heartbeat_interval_ms,
            "max.poll.interval.ms": consumer.max_poll_interval_ms,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": consumer.max_wait_ms,
            "fetch.min.bytes": consumer.fetch_min_bytes,
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
            "enable.partition.eof": False,
        }
        | ({"group.instance.id": consumer.instance_id} if consumer.instance_id else {})
    )


def producer_config(
    kafka: KafkaSettings,
    transactional_id: str | None = None,
    transaction_timeout_ms: int | None = None,
) -> dict[str, str | int | float | bool]:
    """Idempotent producer (acks=all, no duplicates on retry), lz4, small linger for latency;
    transactional when given an id (exactly-once), with `transaction_timeout_ms` (the
    broker's default when None).
    """
    config = kafka.client_config() | {
        "enable.idempotence": True,
        "compression.type": "lz4",
        "linger.ms": LINGER_MS,
        "batch.size": 262_144,
        "queue.buffering.max.messages": 500_000,
    }
    if transactional_id is not None:
        config["transactional.id"] = transactional_id
        if transaction_timeout_ms is not None:
            config["transaction.timeout.ms"] = transaction_timeout_ms
    return config


def connect_catalog(
    registry: SchemaRegistrySettings,
    outputs: Mapping[str, str],
    on_wait: Callable[[RegistryUnavailable], None] = lambda _: None,
) -> Catalog:
    """The catalog of `settings`: static, or the registry with `outputs` (topic → schema
    name) registered under their TopicNameStrategy subjects. A registry that does not
    answer is retried with backoff for `schema_registry.startup_timeout_s` (calling
    `on_wait` before each wait); a refused schema (IncompatibleSchema) fails at once.
    """
    if not registry.enabled:
        return StaticCatalog()
    catalog = RegistryCatalog(registry.client_config(), outputs, registry.compatibility)
    deadline = time.monotonic() + registry.startup_timeout_s
    backoff = registry.retry_backoff_s
    while True:
        try:
            catalog.register_outputs()
            return catalog
        except RegistryUnavailable as exc:
            if time.monotonic() + backoff > deadline:
                raise RegistryUnavailable(
                    exc.cause,
                    f"no usable registry at {registry.url} within "
                    f"{registry.startup_timeout_s:.0f} s (schema_registry.startup_timeout_s)",
                ) from exc
            on_wait(exc)
            time.sleep(backoff)
            backoff = min(2 * backoff, registry.retry_backoff_max_s)


def reading_catalog(registry: SchemaRegistrySettings) -> Catalog:
    """A catalog for reading records back (the demo, tests): it registers nothing."""
    if not registry.enabled:
        return StaticCatalog()
    return RegistryCatalog(registry.client_config(), {}, registry.compatibility)

"""librdkafka configurations of the pipeline's consumer and producer."""

from __future__ import annotations

from pipeline.settings import Settings


def consumer_config(settings: Settings) -> dict[str, str | int | float | bool]:
    """At-least-once consumer: offsets are committed by the checkpoint, never automatically."""
    consumer = settings.consumer
    return (
        settings.kafka.client_config()
        | {
            "group.id": consumer.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": consumer.auto_offset_reset,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": consumer.session_timeout_ms,
            "max.poll.interval.ms": consumer.max_poll_interval_ms,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": consumer.max_wait_ms,
            "fetch.min.bytes": consumer.fetch_min_bytes,
            "enable.partition.eof": False,
        }
        | ({"group.instance.id": consumer.instance_id} if consumer.instance_id else {})
    )


def producer_config(
    settings: Settings, transactional_id: str | None = None
) -> dict[str, str | int | float | bool]:
    """Idempotent producer (acks=all, no duplicates on retry), lz4, small linger for latency;
    transactional when given an id (exactly-once).
    """
    config = settings.kafka.client_config() | {
        "enable.idempotence": True,
        "compression.type": "lz4",
        "linger.ms": 2,
        "batch.size": 262_144,
        "queue.buffering.max.messages": 500_000,
    }
    if transactional_id is not None:
        config["transactional.id"] = transactional_id
        config["transaction.timeout.ms"] = settings.processing.transaction_timeout_ms
    return config

"""Topic creation and offset look-ups."""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from pipeline.settings import Settings


def admin_client(settings: Settings) -> AdminClient:
    """An AdminClient with the shared connection settings."""
    return AdminClient(settings.kafka.client_config())


def pipeline_topics(settings: Settings) -> list[str]:
    """Every topic the pipeline reads or writes."""
    topics = settings.topics
    return [
        topics.input,
        topics.fraud_scores,
        topics.recommendations,
        topics.dead_letter,
        topics.labels,
    ]


def create_topics(
    settings: Settings, names: Iterable[str] | None = None, timeout_s: float = 30
) -> list[str]:
    """Create missing topics with the configured partitions; return those created."""
    admin = admin_client(settings)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [name for name in (names or pipeline_topics(settings)) if name not in existing]
    if not wanted:
        return []
    futures = admin.create_topics(
        [
            NewTopic(name, settings.topics.partitions, settings.topics.replication_factor)
            for name in wanted
        ],
        operation_timeout=timeout_s,
    )
    for future in futures.values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    return wanted


def end_offsets(consumer: Consumer, topic: str, timeout_s: float = 10) -> dict[int, int]:
    """High watermark of each partition of `topic`."""
    metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
    result = {}
    for partition in metadata.partitions:
        _, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=timeout_s
        )
        result[partition] = high
    return result


def committed_offsets(
    consumer: Consumer, topic: str, partitions: Iterable[int], timeout_s: float = 10
) -> dict[int, int]:
    """The group's committed offset per partition (0 where nothing is committed)."""
    committed = consumer.committed(
        [TopicPartition(topic, p) for p in partitions], timeout=timeout_s
    )
    return {tp.partition: max(tp.offset, 0) for tp in committed}

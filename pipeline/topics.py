"""The application's topic catalogue: which topics streamscore reads and writes, how each is
created, which schema each carries, and the pipeline group's lag. One module above the
Kafka layer (`pipeline.kafka`), whose helpers take connection settings and explicit names.
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

import schemas
from pipeline.kafka.admin import PartitionLag, create_new_topics, partition_lag
from pipeline.settings import Settings


def pipeline_topics(settings: Settings) -> list[str]:
    """Every topic the pipeline reads or writes (but the changelog, which it makes)."""
    topics = settings.topics
    return [
        topics.input,
        topics.fraud_scores,
        topics.shadow_scores,
        topics.recommendations,
        topics.dead_letter,
        topics.labels,
        topics.forget,
        topics.input_histograms,
    ]


def monitor_changelog(settings: Settings) -> str:
    """The compacted topic of `streamscore monitor`'s waiting records."""
    return f"{settings.monitor.group_id}.changelog"


def new_topic(settings: Settings, name: str) -> NewTopic:
    """How `name` is created: the configured partitions, but one for the forget topic
    (its requests are read in one order by every instance) and for the monitor's changelog
    (one monitor owns it); the dead-letter and forget topics get their retention, and the
    monitor's changelog is compacted.
    """
    topics = settings.topics
    partitions, config = topics.partitions, {}
    if name == topics.dead_letter:
        config = {"retention.ms": str(topics.dead_letter_retention_ms)}
    elif name == topics.forget:
        partitions, config = 1, {"retention.ms": str(topics.forget_retention_ms)}
    elif name == monitor_changelog(settings):
        partitions, config = 1, {"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"}
    return NewTopic(name, partitions, topics.replication_factor, config=config)


def create_topics(
    settings: Settings, names: Iterable[str] | None = None, timeout_s: float = 30
) -> list[str]:
    """Create missing topics (the pipeline's, or `names`) as `new_topic` says; return
    those created.
    """
    specs = [new_topic(settings, name) for name in (names or pipeline_topics(settings))]
    return create_new_topics(settings.kafka, specs, timeout_s)


def group_lag(settings: Settings, timeout_s: float = 10) -> list[PartitionLag]:
    """Per-partition committed offset, end offset, lag and owner of the pipeline's group."""
    return partition_lag(
        settings.kafka, settings.topics.input, settings.consumer.group_id, timeout_s
    )


def pipeline_outputs(settings: Settings) -> dict[str, str]:
    """Topic → schema name of every topic the pipeline writes."""
    topics = settings.topics
    return {
        topics.fraud_scores: schemas.FRAUD_SCORE,
        topics.shadow_scores: schemas.FRAUD_SCORE,
        topics.recommendations: schemas.RECOMMENDATION,
        topics.dead_letter: schemas.DEAD_LETTER,
        topics.input_histograms: schemas.INPUT_HISTOGRAM,
    }


def producer_outputs(settings: Settings) -> dict[str, str]:
    """Topic → schema name of what a clickstream producer (the generator) writes."""
    return {settings.topics.input: schemas.CLICK_EVENT, settings.topics.labels: schemas.FRAUD_LABEL}


def monitor_outputs(settings: Settings) -> dict[str, str]:
    """Topic → schema name of what `streamscore monitor` writes."""
    return {settings.topics.model_quality: schemas.MODEL_QUALITY}

"""Typed access to what confluent-kafka leaves optional on a consumed message, and reading a
topic's committed messages to its end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message
from confluent_kafka import TopicPartition as Position

from pipeline.kafka.admin import topic_partitions
from pipeline.settings import KafkaSettings


def position(message: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed message (always set when it has no error)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError("message has no position; only consumed messages do")
    return topic, partition, offset


def read_messages(
    kafka: KafkaSettings,
    topic: str,
    timeout_s: float = 60,
    since_ms: int | None = None,
    progress: Callable[[], None] = lambda: None,
) -> list[Message]:
    """Every committed message of `topic`, from each partition's start (or its first message
    at or after `since_ms`), read until each partition reports its end, which a
    transaction's trailing marker cannot delay; `progress` is called after each fetch.
    """
    consumer = Consumer(
        kafka.client_config()
        | {
            "group.id": f"reader-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,  # an empty partition reports its end at once
        }
    )
    try:
        starts = [Position(topic, p, OFFSET_BEGINNING) for p in topic_partitions(consumer, topic)]
        if since_ms is not None:
            found = consumer.offsets_for_times(
                [Position(topic, tp.partition, since_ms) for tp in starts], timeout=30
            )
            starts = [tp for tp in found if tp.offset >= 0]  # -1: nothing that recent
        consumer.assign(starts)
        pending = {tp.partition for tp in starts}
        out: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{topic}: partitions {sorted(pending)} not read to their end in "
                    f"{timeout_s:.0f}s ({len(out)} records read)"
                )
            for message in consumer.consume(10_000, 0.5):
                error = message.error()
                if error is None:
                    out.append(message)
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(message.partition())
                else:
                    raise KafkaException(error)
            progress()
        return out
    finally:
        consumer.close()

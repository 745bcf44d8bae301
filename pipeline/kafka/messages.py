"""Typed access to what confluent-kafka leaves optional on a consumed message."""

from __future__ import annotations

from confluent_kafka import Message


def position(message: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed message (always set when it has no error)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError("message has no position; only consumed messages do")
    return topic, partition, offset

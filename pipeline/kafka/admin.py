"""Topic creation and deletion, and offset look-ups, on any cluster: these helpers take the
connection settings and explicit names, and know nothing of the application's topics
(`pipeline.topics` does).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    NewTopic,
    TopicMetadata,
)

from pipeline.kafka.errors import kafka_error
from pipeline.settings import KafkaSettings
from schemas.errors import StreamscoreError


class KafkaConnectionError(StreamscoreError, ConnectionError):
    """The cluster cannot be reached or refuses our credentials; the message says which."""


class TopicNotReady(StreamscoreError, TimeoutError):
    """A topic's metadata did not show it whole (each partition with a leader) in time."""


def admin_client(kafka: KafkaSettings) -> AdminClient:
    """An AdminClient with the shared connection settings."""
    return AdminClient(kafka.client_config())


def connect(kafka: KafkaSettings, timeout_s: float = 30) -> AdminClient:
    """An AdminClient that has answered a metadata request; fails fast and says why.

    librdkafka retries a refused login forever in the background and a metadata request
    just times out, so the client's error callback is watched for authentication and TLS
    failures and those end the wait at once.
    """
    refused: list[str] = []

    def on_error(error: KafkaError) -> None:
        if error.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL):
            refused.append(error.str())

    config: dict[str, Any] = kafka.client_config() | {"error_cb": on_error}
    admin = AdminClient(config)
    bootstrap = kafka.bootstrap_servers
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=1)
            return admin
        except KafkaException as exc:
            admin.poll(0)  # serves the error callback
            if refused:
                raise KafkaConnectionError(
                    f"Kafka at {bootstrap} refused the connection "
                    f"({kafka.security_protocol.value}): {refused[0]}"
                ) from exc
            if time.monotonic() > deadline:
                raise KafkaConnectionError(
                    f"Kafka at {bootstrap} did not answer in {timeout_s:.0f}s: {exc}"
                ) from exc


def delete_topics(admin: AdminClient, names: Sequence[str], timeout_s: float = 30) -> None:
    """Delete `names`, waiting for the broker; a topic already gone is not an error."""
    if not names:
        return
    for future in admin.delete_topics(list(names), operation_timeout=timeout_s).values():
        try:
            future.result()
        except KafkaException as exc:
            if kafka_error(exc).code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise


def create_new_topics(
    kafka: KafkaSettings, specs: Sequence[NewTopic], timeout_s: float = 30
) -> list[str]:
    """Create those of `specs` that do not exist yet, and wait until each has all its
    partitions with a leader; return the names created.
    """
    admin = connect(kafka, timeout_s)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = {spec.topic: spec for spec in specs if spec.topic not in existing}
    if not wanted:
        return []
    futures = admin.create_topics(list(wanted.values()), operation_timeout=timeout_s)
    for future in futures.values():
        try:
            future.result()
        except KafkaException as exc:
            if kafka_error(exc).name() != "TOPIC_ALREADY_EXISTS":
                raise
    for topic in futures:
        topic_partitions(admin, topic, timeout_s, expected=wanted[topic].num_partitions)
    return list(wanted)


def topic_partitions(
    client: AdminClient | Consumer, topic: str, timeout_s: float = 30, expected: int | None = None
) -> list[int]:
    """The partitions of `topic` once the broker's metadata shows it whole: known, with
    `expected` partitions (when given), each with a leader.

    CreateTopics answers once the controller has committed the topic, before the broker's
    metadata cache has applied it. A metadata read right after creation can then find the
    topic unknown, with no partitions: on this machine kind with one core kept busy, 29 of
    40 reads did. A reader assigned from such a read is assigned nothing and waits for
    ever, so every reader asks here, and this polls until the topic is whole.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = max(deadline - time.monotonic(), 0.1)
        problem: str | None
        try:
            found = client.list_topics(topic, timeout=min(remaining, 5.0)).topics.get(topic)
        except KafkaException as exc:  # no answer yet: a busy or restarting broker
            found, problem = None, str(kafka_error(exc))
        else:
            problem = _incomplete(found, expected)
        if found is not None and problem is None:
            return sorted(found.partitions)
        if time.monotonic() >= deadline:
            raise TopicNotReady(f"topic {topic!r} not ready after {timeout_s:.0f}s: {problem}")
        time.sleep(0.05)


def _incomplete(found: TopicMetadata | None, expected: int | None) -> str | None:
    """Why a topic's metadata is not yet usable, or None when it is."""
    if found is None:
        return "absent from the metadata"
    if found.error is not None:
        return str(found.error)
    partitions = found.partitions
    if not partitions or (expected is not None and len(partitions) != expected):
        return f"{len(partitions)} partitions listed, {expected or 'at least 1'} wanted"
    leaderless = sorted(p for p, meta in partitions.items() if meta.leader < 0 or meta.error)
    if leaderless:
        return f"partitions {leaderless} have no leader"
    return None


# A partition whose leadership is still settling: a new topic, a broker restart; or one the
# client's metadata does not hold yet (the local codes: a new client whose bootstrap or
# leader is down).
_LEADER_MOVING = (
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._UNKNOWN_TOPIC,
)
# The leader's broker went away mid-request (killed, stopped, restarting): another replica
# leads once the controller fences it. `streamscore chaos` found _DESTROY_BROKER ("Broker
# handle destroyed without termination") stopping instances that started meanwhile.
_BROKER_GONE = (
    KafkaError._DESTROY_BROKER,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError.REQUEST_TIMED_OUT,
)
_TRY_S = 5.0  # the longest one ListOffsets try waits


def watermarks(
    consumer: Consumer, topic: str, partition: int, timeout_s: float = 10
) -> tuple[int, int]:
    """The (low, high) watermarks of one partition, asked again while its leadership is
    still settling or its leader's broker has gone, until `timeout_s`.

    The metadata can name a leader before that broker answers ListOffsets for it: right
    after the forget topic was created, `make test` once got NOT_LEADER_FOR_PARTITION here
    (confluent-kafka marks it not retriable and does not ask again itself).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        # A try at most `_TRY_S`: one asks the leader the client's metadata names, and a
        # dead one holds it to its timeout; the next try asks the leader elected since.
        remaining = min(max(deadline - time.monotonic(), 0.1), _TRY_S)
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=remaining
            )
            return int(low), int(high)
        except KafkaException as exc:
            code = kafka_error(exc).code()
            settling = code in _LEADER_MOVING or code in _BROKER_GONE
            if not settling or time.monotonic() >= deadline:
                raise
            # Ask for fresh metadata: a client that knows a dead leader asks it again.
            with contextlib.suppress(KafkaException):
                consumer.list_topics(topic, timeout=min(_TRY_S, remaining))
            time.sleep(0.05)


def end_offsets(consumer: Consumer, topic: str, timeout_s: float = 10) -> dict[int, int]:
    """High watermark of each partition of `topic`."""
    return {
        partition: watermarks(consumer, topic, partition, timeout_s)[1]
        for partition in topic_partitions(consumer, topic, timeout_s)
    }


def committed_offsets(
    consumer: Consumer, topic: str, partitions: Iterable[int], timeout_s: float = 10
) -> dict[int, int]:
    """The group's committed offset per partition (0 where nothing is committed)."""
    committed = consumer.committed(
        [TopicPartition(topic, p) for p in partitions], timeout=timeout_s
    )
    return {tp.partition: max(tp.offset, 0) for tp in committed}


_COORDINATOR_MOVING = (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS)


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One input partition of a consumer group, as kafka-consumer-groups shows it."""

    topic: str
    partition: int
    committed: int | None  # None: the group has committed nothing here
    end: int
    owner: str | None  # the member's client id and host, when the group is active

    @property
    def lag(self) -> int:
        """Records between the committed offset (or the start) and the end."""
        return self.end - (self.committed or 0)


def partition_lag(
    kafka: KafkaSettings, topic: str, group: str, timeout_s: float = 10
) -> list[PartitionLag]:
    """Per-partition committed offset, end offset, lag and owner of `group` on `topic`."""
    consumer = Consumer(kafka.client_config() | {"group.id": group})
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                ends = end_offsets(consumer, topic, timeout_s)
                committed = consumer.committed(
                    [TopicPartition(topic, p) for p in sorted(ends)], timeout=timeout_s
                )
                break
            except KafkaException as exc:  # e.g. the group coordinator is still loading
                error = kafka_error(exc)
                if not error.retriable() and error.code() not in _COORDINATOR_MOVING:
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()
    owners: dict[int, str] = {}
    admin = admin_client(kafka)  # held: a collected client never completes its futures
    request = admin.describe_consumer_groups([group], request_timeout=timeout_s)[group]
    described = request.result(timeout=timeout_s)
    for member in described.members:
        for tp in member.assignment.topic_partitions if member.assignment else []:
            if tp.topic == topic:
                owners[tp.partition] = f"{member.client_id}@{member.host}"
    return [
        PartitionLag(
            topic=topic,
            partition=tp.partition,
            committed=tp.offset if tp.offset >= 0 else None,
            end=ends[tp.partition],
            owner=owners.get(tp.partition),
        )
        for tp in committed
    ]

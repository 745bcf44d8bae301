"""Erasure on request: `streamscore forget --user-id ID` writes a request to the forget
topic; every pipeline instance reads that topic and drops the user from the partitions it
owns, with a changelog tombstone, so a restore does not bring the user back.

Why a topic that every instance reads, rather than a call to one instance: whoever asks
knows neither which partition holds the user (that depends on the producers' partitioner)
nor which instance owns it now, and ownership moves in rebalances. The topic outlives both.

How a request reaches state exactly once, across restarts and rebalances:
- The forget topic has one partition: one order of requests for everyone. A request's key
  is the user id; its Kafka timestamp is when it was made; its value is empty.
- Every changelog partition remembers, under the control key FORGET_POSITION, the forget
  offset up to which its state has applied requests. That record travels with the
  partition's tombstones: in the same transaction under exactly-once, after them in the
  same partition (so acknowledged no earlier) under at-least-once.
- After restoring a partition, its new owner applies the requests from that position on:
  those made while the partition moved or no instance ran. Requests it has applied are
  never applied again, so a forgotten user who came back keeps the new state.
- Between batches each instance reads new requests (one non-blocking fetch) and applies
  them to every partition it owns.

The record of each erasure is a log line (`forget_applied`) per owned partition: the
request's offset and time, the partition, whether it held the user, and `subject`, a keyed
hash of the user id, so an auditor who holds the key can find the entries for a user id, and
nobody else can.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
)
from confluent_kafka import TopicPartition as Position

from pipeline.kafka.admin import watermarks
from pipeline.kafka.messages import position
from pipeline.logging import get_logger
from pipeline.serve.state.pseudonym import Pseudonyms
from pipeline.serve.state.table import CONTROL, UserTable
from pipeline.settings import Settings
from pipeline.topics import create_topics

log = get_logger()

FORGET_POSITION = CONTROL + b"forget-position"
_SUBJECT_DOMAIN = b"forget"


@dataclass(frozen=True, slots=True)
class Request:
    """One erasure request as read from the forget topic."""

    offset: int
    user_key: bytes
    requested_ms: int


def request_forget(settings: Settings, user_id: str, timeout_s: float = 30) -> Request:
    """Write an erasure request for `user_id`; return it once the broker has it."""
    if not user_id:
        raise ValueError("user_id is empty")
    create_topics(settings, [settings.topics.forget], timeout_s)
    producer = Producer(settings.kafka.client_config() | {"acks": "all"})
    delivered: list[Request] = []
    failures: list[str] = []

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            failures.append(error.str())
            return
        _, _, offset = position(message)
        delivered.append(Request(offset, user_id.encode(), message.timestamp()[1]))

    producer.produce(settings.topics.forget, b"", user_id.encode(), on_delivery=on_delivery)
    if producer.flush(timeout_s) or failures or not delivered:
        raise KafkaException(f"forget request not acknowledged: {failures or 'timed out'}")
    return delivered[0]


def ensure_forget_topic(settings: Settings, timeout_s: float = 30) -> None:
    """Create the forget topic (one partition, its retention) if it is missing."""
    create_topics(settings, [settings.topics.forget], timeout_s)


def _position_bytes(offset: int) -> bytes:
    return offset.to_bytes(8, "big")


class Forgetter:
    """Applies erasure requests to the partitions this instance owns."""

    def __init__(
        self,
        settings: Settings,
        store: UserTable,
        pseudonyms: Pseudonyms,
        on_forgotten: Callable[[int], None] = lambda _: None,
    ) -> None:
        """Tail the forget topic from its current end; `on_forgotten(n)` counts the users
        dropped (a metric).
        """
        self._settings = settings
        self._topic = settings.topics.forget
        self._store = store
        self._pseudonyms = pseudonyms
        self._on_forgotten = on_forgotten
        self._positions: dict[int, int] = {}  # owned partition -> next request to apply
        self._caught_up = False  # `assigned` changed state that no batch has carried yet
        self._tail = self._consumer("tail")
        # An explicit start, not OFFSET_END (resolved at the first fetch, later): a request
        # between this end and that fetch would be missed by partitions assigned meanwhile.
        self._tail.assign([Position(self._topic, 0, self._end())])

    def _consumer(self, role: str) -> Consumer:
        return Consumer(
            self._settings.kafka.client_config()
            | {
                "group.id": f"{self._settings.consumer.group_id}.forget-{role}",  # never commits
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",  # a position gone with retention: the oldest
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 10,
            }
        )

    def _end(self) -> int:
        return watermarks(self._tail, self._topic, 0, timeout_s=30)[1]

    def assigned(self, partitions: list[int], controls: dict[tuple[int, bytes], bytes]) -> None:
        """After `partitions` were restored (`controls` from their changelog): apply the
        requests each has not applied yet.
        """
        if not partitions:  # a cooperative rebalance that brought none
            return
        end = self._end()
        behind: dict[int, int] = {}
        for partition in partitions:
            found = controls.get((partition, FORGET_POSITION))
            applied = int.from_bytes(found, "big") if found is not None else 0
            self._positions[partition] = max(applied, end)
            if applied < end:
                behind[partition] = applied
        if not behind:
            return
        requests = self._read(min(behind.values()), end)
        for partition, applied in behind.items():
            self._apply(partition, [r for r in requests if r.offset >= applied])
            self._store.put_control(partition, FORGET_POSITION, _position_bytes(end))
        self._caught_up = True

    def revoked(self, partitions: list[int]) -> None:
        """Stop applying requests to partitions this instance no longer owns."""
        for partition in partitions:
            self._positions.pop(partition, None)

    def poll(self) -> bool:
        """Apply requests that arrived since the last call; True when state changed here
        or in `assigned` since (its tombstones and positions are pending changelog records).
        """
        changed, self._caught_up = self._caught_up, False
        requests = self._requests(self._tail.consume(100, 0))
        if not requests:
            return changed
        for partition, next_offset in self._positions.items():
            due = [r for r in requests if r.offset >= next_offset]
            if due:
                self._apply(partition, due)
                self._positions[partition] = due[-1].offset + 1
                value = _position_bytes(due[-1].offset + 1)
                self._store.put_control(partition, FORGET_POSITION, value)
                changed = True
        return changed

    def close(self) -> None:
        """Close the tail consumer."""
        self._tail.close()

    def _apply(self, partition: int, requests: list[Request]) -> None:
        for request in requests:
            held = self._store.forget(partition, request.user_key)
            if held:
                self._on_forgotten(1)
            log.info(
                "forget_applied",
                topic=self._topic,
                offset=request.offset,
                requested_ms=request.requested_ms,
                partition=partition,
                held=held,
                subject=self._pseudonyms.digest(request.user_key, _SUBJECT_DOMAIN),
            )

    def _read(self, start: int, end: int) -> list[Request]:
        """Requests at offsets [start, end), read with a consumer of their own."""
        consumer = self._consumer("catch-up")
        requests: list[Request] = []
        try:
            consumer.assign([Position(self._topic, 0, start if start > 0 else OFFSET_BEGINNING)])
            deadline = time.monotonic() + 60
            last = start - 1
            while last < end - 1:
                if time.monotonic() > deadline:
                    raise KafkaException(f"reading {self._topic} [{start}, {end}) timed out")
                batch = self._requests(consumer.consume(1000, 0.1))
                requests.extend(r for r in batch if r.offset < end)
                if batch:
                    last = batch[-1].offset
                else:  # retention may have removed the rest of the range
                    low, _ = watermarks(consumer, self._topic, 0, timeout_s=30)
                    last = max(last, low - 1)
        finally:
            consumer.close()
        return requests

    @staticmethod
    def _requests(messages: list[Message]) -> list[Request]:
        requests = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(error)
            key = message.key()
            if key:  # a request without a user id names nobody
                _, _, offset = position(message)
                requests.append(Request(offset, key, message.timestamp()[1]))
        return requests

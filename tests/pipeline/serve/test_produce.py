"""Dead-letter records: what they keep, and what the redact mode leaves out; releasing the
producer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from confluent_kafka import Producer

from pipeline.serve.produce import Sink, dead_letter
from pipeline.serve.records import Rejected
from pipeline.serve.state.pseudonym import Pseudonyms
from pipeline.settings import TopicSettings
from pipeline.tools.local_broker import free_port


@dataclass
class FakeMessage:
    """The parts of a consumed message a dead letter reads."""

    _key: bytes | None
    _value: bytes | None

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def topic(self) -> str:
        return "clickstream"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 41


ERROR = Rejected(0, 2, 41, "decode.malformed", "ValueError: bad value 'device-XYZ'")
MESSAGE = FakeMessage(b"user-7", b"\x00\x00\x00\x00\x01device-XYZ 203.0.113.9")


def test_a_dead_letter_keeps_the_payload_by_default() -> None:
    record = dead_letter(MESSAGE, ERROR)  # type: ignore[arg-type]
    assert record["original_key"] == b"user-7"
    assert record["original_value"] == MESSAGE.value()
    assert record["error_message"] == ERROR.detail
    assert record["payload_hash"] is None
    assert (record["source_topic"], record["source_partition"], record["source_offset"]) == (
        "clickstream",
        2,
        41,
    )


def test_redact_keeps_the_reason_the_position_and_a_keyed_hash_only() -> None:
    pseudonyms = Pseudonyms(b"a dead-letter test key")
    record = dead_letter(MESSAGE, ERROR, pseudonyms)  # type: ignore[arg-type]
    assert record["original_key"] is None and record["original_value"] is None
    assert record["error_message"] == ""
    assert record["error_kind"] == "decode.malformed"
    assert (record["source_partition"], record["source_offset"]) == (2, 41)
    assert b"device-XYZ" not in repr(record).encode()
    # Keyed: the same payload matches under the key, and differs under another.
    assert record["payload_hash"] == pseudonyms.digest(MESSAGE.value() or b"")
    assert len(record["payload_hash"]) == 32
    other = Pseudonyms(b"another dead-letter key")
    assert dead_letter(MESSAGE, ERROR, other)["payload_hash"] != record["payload_hash"]  # type: ignore[arg-type]


def test_closing_a_sink_whose_broker_is_gone_drops_its_records_and_returns() -> None:
    # Producer.close() flushes without a timeout: without the purge before it, a sink
    # whose broker is gone would never return, and its client would go on reconnecting.
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{free_port()}", "log_level": 0})
    sink = Sink(producer, TopicSettings(), "changelog", {})
    sink.publish_records("scores", [(b"user-7", b"score")])
    assert sink.in_flight() >= 1  # the record (librdkafka counts its own events too)
    closing = threading.Thread(target=sink.close, kwargs={"timeout_s": 0.2}, daemon=True)
    closing.start()
    closing.join(timeout=30)
    assert not closing.is_alive(), "Sink.close waited on a broker that is gone"

"""The pipeline against the real broker: valid events scored, bad input dead-lettered."""

import threading
import time

import pytest
from confluent_kafka import Consumer, Producer

import schemas
from pipeline.codec import Encoder
from pipeline.demo import read_topic
from pipeline.generator import GeneratorConfig, generate
from pipeline.kafka.admin import committed_offsets, end_offsets
from pipeline.kafka.clients import producer_config
from pipeline.runner import run_pipeline

pytestmark = pytest.mark.integration

BAD_INPUTS = [
    (b"u-bad", b"", "decode.empty_payload"),
    (b"u-bad", b"definitely not avro", "decode.bad_magic_byte"),
    (b"u-bad", b"\x00\x00\x00\x01\x00\x01\x02", "decode.unknown_schema_id"),
    (b"u-bad", None, "truncated"),  # filled below: a valid event cut short
    (None, None, "validate.key_missing"),  # filled below: a valid event without a key
]


def produce_with_bad_input(settings, events):
    encoder = Encoder(schemas.CLICK_EVENT)
    producer = Producer(producer_config(settings))  # idempotent: keeps production order
    expected_dead = []
    for i, (event, _) in enumerate(events):
        payload = encoder.encode(event)
        producer.produce(settings.topics.input, key=event["user_id"].encode(), value=payload)
        if i % 40 == 0:
            key, value, kind = BAD_INPUTS[(i // 40) % len(BAD_INPUTS)]
            if kind == "truncated":
                value, kind = payload[:-3], "decode.truncated"
            elif kind == "validate.key_missing":
                value = payload
            producer.produce(settings.topics.input, key=key, value=value)
            expected_dead.append((key, value, kind))
    assert producer.flush(30) == 0
    return expected_dead


def wait_for_commit(settings, timeout_s=90):
    consumer = Consumer(settings.kafka.client_config() | {"group.id": settings.consumer.group_id})
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ends = end_offsets(consumer, settings.topics.input)
            if (
                sum(ends.values())
                and committed_offsets(consumer, settings.topics.input, ends) == ends
            ):
                return
            time.sleep(0.3)
        raise AssertionError("pipeline did not commit all input in time")
    finally:
        consumer.close()


def test_bad_input_is_dead_lettered_and_neighbours_are_scored(kafka_settings):
    config = GeneratorConfig(events=1500, users=60, seed=5).anchored_before(time.time())
    events = list(generate(config))
    expected_dead = produce_with_bad_input(kafka_settings, events)

    stop = threading.Event()
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(stats=run_pipeline(kafka_settings, stop))
    )
    worker.start()
    try:
        wait_for_commit(kafka_settings)
    finally:
        stop.set()
        worker.join(60)
    assert not worker.is_alive()

    topics = kafka_settings.topics
    scores = read_topic(kafka_settings, topics.fraud_scores, schemas.FRAUD_SCORE)
    dead = read_topic(kafka_settings, topics.dead_letter, schemas.DEAD_LETTER)
    recs = read_topic(kafka_settings, topics.recommendations, schemas.RECOMMENDATION)

    assert sorted(r["event_id"] for r, _ in scores) == sorted(e["event_id"] for e, _ in events)
    # Kafka may hand back an empty key or value as null; compare them the same way.
    found = sorted(
        (r["original_key"] or b"", r["original_value"] or b"", r["error_kind"]) for r, _ in dead
    )
    assert found == sorted((k or b"", v or b"", kind) for k, v, kind in expected_dead)
    assert all(r["source_topic"] == topics.input and r["source_offset"] >= 0 for r, _ in dead)
    with_candidates = {e["event_id"]: e["candidates"] for e, _ in events if e["candidates"]}
    assert {r["event_id"] for r, _ in recs} == set(with_candidates)
    for record, _ in recs:
        ranked = [item["item_id"] for item in record["items"]]
        assert set(ranked) <= set(with_candidates[record["event_id"]])
        scores_desc = [item["score"] for item in record["items"]]
        assert scores_desc == sorted(scores_desc, reverse=True)
    decisions = {r["decision"] for r, _ in scores}
    assert decisions <= {"allow", "review", "block"}
    assert result["stats"].dead_lettered == len(expected_dead)

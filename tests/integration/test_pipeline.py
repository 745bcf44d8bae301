"""The pipeline against the real broker: valid events scored, bad input dead-lettered."""

import copy
import io
import struct
import time

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from fastavro import parse_schema, schemaless_writer

import schemas
from pipeline.kafka.admin import TopicNotReady, committed_offsets, end_offsets
from pipeline.kafka.clients import producer_config
from pipeline.tools.demo import read_topic
from pipeline.training.generator import GeneratorConfig, generate
from schemas.codec import Encoder
from tests.integration.running import PipelineStopped, Running

pytestmark = pytest.mark.integration


def _unknown_enum_symbol(event):
    """The event written with a newer writer's enum symbol, framed with our schema id."""
    schema = copy.deepcopy(schemas.raw(schemas.CLICK_EVENT))
    field = next(f for f in schema["fields"] if f["name"] == "event_type")
    field["type"]["symbols"].append("teleport")
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(schema), event | {"event_type": "teleport"})
    return struct.pack(">bI", 0, schemas.CURRENT_ID[schemas.CLICK_EVENT]) + body.getvalue()


def _changed(**changes):
    return lambda event, encoder: encoder.encode(event | changes)


DAY_MS = 86_400_000
# (key, value from the neighbouring valid event, the dead-letter reason it must get)
BAD_INPUTS = [
    ("user", lambda event, encoder: b"", "decode.empty_payload"),
    ("user", lambda event, encoder: b"definitely not avro", "decode.bad_magic_byte"),
    ("user", lambda event, encoder: b"\x00\x00\x00\x01\x00\x01\x02", "decode.unknown_schema_id"),
    ("user", lambda event, encoder: encoder.encode(event)[:-3], "decode.truncated"),
    ("user", lambda event, encoder: _unknown_enum_symbol(event), "decode.invalid_index"),
    (None, lambda event, encoder: encoder.encode(event), "validate.key_missing"),
    (b"", lambda event, encoder: encoder.encode(event), "validate.key_missing"),
    ("user", _changed(price=float("nan")), "validate.price_not_finite"),
    ("user", _changed(payment_amount=float("inf")), "validate.payment_amount_not_finite"),
    ("user", _changed(price=-5.0), "validate.price_negative"),
    ("user", _changed(quantity=10**9), "validate.quantity_out_of_range"),
    (
        "user",
        lambda e, enc: enc.encode(e | {"event_time": e["event_time"] + 365 * DAY_MS}),
        "validate.event_time_future",
    ),
    (
        "user",
        lambda e, enc: enc.encode(e | {"event_time": e["event_time"] - 3650 * DAY_MS}),
        "validate.event_time_too_old",
    ),
    ("user", _changed(device_id="d" * 10_000), "validate.string_too_long"),
]


def produce_with_bad_input(settings, events):
    """Events with a bad input after every 40th, and every 50th given out-of-vocabulary ids
    (valid: they must be scored). Returns the expected dead letters and the events.
    """
    encoder = Encoder(schemas.CLICK_EVENT)
    producer = Producer(producer_config(settings.kafka))  # idempotent: keeps production order
    expected_dead, sent = [], []
    for i, (event, _) in enumerate(events):
        if i % 50 == 25:
            event = event | {"item_id": 10**12, "category_id": -9, "candidates": [10**12, -5, 3]}
        sent.append(event)
        producer.produce(
            settings.topics.input, key=event["user_id"].encode(), value=encoder.encode(event)
        )
        if i % 40 == 0:
            key, make_value, kind = BAD_INPUTS[(i // 40) % len(BAD_INPUTS)]
            key = event["user_id"].encode() if key == "user" else key
            value = make_value(event | {"event_id": f"bad-{i}"}, encoder)
            producer.produce(settings.topics.input, key=key, value=value)
            expected_dead.append((key, value, kind))
    assert producer.flush(30) == 0
    return expected_dead, sent


def wait_for_commit(settings, timeout_s=90, running=None):
    """Until the group has committed the end of every input partition; with `running`, the
    pipeline's own error as soon as it stops on one.
    """
    consumer = Consumer(settings.kafka.client_config() | {"group.id": settings.consumer.group_id})
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if running is not None:
                running.check()
            try:
                ends = end_offsets(consumer, settings.topics.input)
                done = committed_offsets(consumer, settings.topics.input, ends)
            except (KafkaException, TopicNotReady):  # a restarting broker: leaders elected
                done, ends = None, {}
            if sum(ends.values()) and done == ends:
                return
            time.sleep(0.3)
        raise AssertionError("pipeline did not commit all input in time")
    finally:
        consumer.close()


def test_bad_input_is_dead_lettered_and_neighbours_are_scored(kafka_settings):
    config = GeneratorConfig(events=1500, users=60, seed=5).anchored_before(time.time())
    expected_dead, events = produce_with_bad_input(kafka_settings, list(generate(config)))
    assert {kind for _, _, kind in expected_dead} == {kind for _, _, kind in BAD_INPUTS}

    running = Running(kafka_settings)
    try:
        wait_for_commit(kafka_settings, running=running)
    finally:
        stats = running.close()

    topics = kafka_settings.topics
    scores = read_topic(kafka_settings, topics.fraud_scores, schemas.FRAUD_SCORE)
    dead = read_topic(kafka_settings, topics.dead_letter, schemas.DEAD_LETTER)
    recs = read_topic(kafka_settings, topics.recommendations, schemas.RECOMMENDATION)

    assert sorted(r["event_id"] for r, _ in scores) == sorted(e["event_id"] for e in events)
    # Kafka may hand back an empty key or value as null; compare them the same way.
    found = sorted(
        (r["original_key"] or b"", r["original_value"] or b"", r["error_kind"]) for r, _ in dead
    )
    assert found == sorted((k or b"", v or b"", kind) for k, v, kind in expected_dead)
    assert all(r["source_topic"] == topics.input and r["source_offset"] >= 0 for r, _ in dead)
    with_candidates = {e["event_id"]: e["candidates"] for e in events if e["candidates"]}
    assert {r["event_id"] for r, _ in recs} == set(with_candidates)
    for record, _ in recs:
        ranked = [item["item_id"] for item in record["items"]]
        assert set(ranked) <= set(with_candidates[record["event_id"]])
        scores_desc = [item["score"] for item in record["items"]]
        assert scores_desc == sorted(scores_desc, reverse=True)
    decisions = {r["decision"] for r, _ in scores}
    assert decisions <= {"allow", "review", "block"}
    assert stats.dead_lettered == len(expected_dead)


def test_a_pipeline_that_stops_on_an_error_raises_it_where_the_test_waits(kafka_settings):
    # No pseudonym key: run_pipeline fails at once, naming the setting. A wait on the
    # pipeline raises that error, not its own timeout.
    settings = kafka_settings.model_copy(
        update={"privacy": kafka_settings.privacy.model_copy(update={"pseudonym_key": None})}
    )
    running = Running(settings)
    running.thread.join(30)
    with pytest.raises(PipelineStopped) as stopped:
        wait_for_commit(settings, timeout_s=5, running=running)
    assert "privacy.pseudonym_key" in str(stopped.value.__cause__)
    with pytest.raises(PipelineStopped):
        running.close()

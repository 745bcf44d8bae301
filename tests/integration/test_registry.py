"""The pipeline against the real schema registry (Apicurio, KafkaSQL storage) and the real
broker: producers and consumers that use Confluent's own serializers, schema evolution, an
incompatible schema, unknown ids, and a registry restart in the middle of a stream.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.request

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from typer.testing import CliRunner

import schemas
from pipeline.cli import app
from pipeline.kafka.admin import topic_partitions
from pipeline.kafka.clients import connect_catalog
from pipeline.tools.demo import read_topic
from pipeline.tools.local_broker import free_port
from pipeline.topics import pipeline_outputs
from pipeline.training.generator import ClickstreamGenerator, GeneratorConfig
from schemas.catalog import IncompatibleSchema, subject
from tests.integration.running import Running
from tests.integration.test_pipeline import wait_for_commit


def events(count, seed):
    config = GeneratorConfig(events=count, users=40, seed=seed).anchored_before(time.time())
    return [event for event, _ in ClickstreamGenerator(config)]


def click_v2():
    """ClickEvent with a new optional field: BACKWARD compatible with v1."""
    schema = copy.deepcopy(schemas.raw(schemas.CLICK_EVENT))
    schema["fields"].append({"name": "referrer", "type": ["null", "string"], "default": None})
    return schema


def click_v3():
    """ClickEvent with a new required field: a v3 reader cannot read v1 data (not BACKWARD)."""
    schema = copy.deepcopy(schemas.raw(schemas.CLICK_EVENT))
    schema["fields"].append({"name": "tenant", "type": "string"})
    return schema


def client(settings):
    return SchemaRegistryClient(settings.schema_registry.client_config())


def serializer(settings, schema):
    return AvroSerializer(
        client(settings),
        json.dumps(schema),
        conf={"auto.register.schemas": True, "subject.name.strategy.type": "TOPIC"},
    )


def produce(settings, serialize, records):
    """Write `records` to the input with `serialize` (a Confluent AvroSerializer)."""
    producer = Producer(settings.kafka.client_config())
    topic = settings.topics.input
    context = SerializationContext(topic, MessageField.VALUE)
    for record in records:
        producer.produce(topic, key=record["user_id"].encode(), value=serialize(record, context))
    assert producer.flush(30) == 0


def produce_raw(settings, key, value):
    producer = Producer(settings.kafka.client_config())
    producer.produce(settings.topics.input, key=key, value=value)
    assert producer.flush(30) == 0


def read_with_deserializer(settings, topic):
    """Every record of `topic`, read with Confluent's AvroDeserializer."""
    deserialize = AvroDeserializer(client(settings))
    consumer = Consumer(
        settings.kafka.client_config()
        | {"group.id": f"reader-{time.monotonic_ns()}", "enable.partition.eof": True}
    )
    partitions = set(topic_partitions(consumer, topic))
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    context = SerializationContext(topic, MessageField.VALUE)
    out = []
    deadline = time.monotonic() + 60
    try:
        while partitions and time.monotonic() < deadline:
            for message in consumer.consume(500, 0.5):
                if message.error() is None:
                    out.append(deserialize(message.value(), context))
                elif message.error().code() == -191:  # _PARTITION_EOF
                    partitions.discard(message.partition())
    finally:
        consumer.close()
    assert not partitions, f"{topic} not read to its end"
    return out


def test_serializer_producers_v1_and_v2_are_scored_and_outputs_read_with_deserializer(
    registry_settings,
):
    settings = registry_settings
    v1, v2 = events(300, seed=11), events(200, seed=12)
    for event in v2:
        event["referrer"] = "https://example.test/"
    produce(settings, serializer(settings, schemas.raw(schemas.CLICK_EVENT)), v1)
    produce(settings, serializer(settings, click_v2()), v2)
    registry = client(settings)
    versions = registry.get_versions(subject(settings.topics.input))
    assert len(versions) == 2  # v1 and v2, both accepted under BACKWARD

    # An id the registry does not know, and a writer that cannot be read as a ClickEvent.
    produce_raw(settings, b"u-unknown", b"\x00\x7f\xff\xff\xf0" + b"\x02")
    incompatible = {
        "type": "record",
        "name": "ClickEvent",
        "namespace": "streamscore",
        "fields": [{"name": "event_id", "type": "long"}],
    }
    bad = AvroSerializer(registry, json.dumps(incompatible), conf={"auto.register.schemas": True})
    bad_context = SerializationContext("elsewhere", MessageField.VALUE)
    produce_raw(settings, b"u-incompatible", bad({"event_id": 5}, bad_context))

    running = Running(settings)
    try:
        wait_for_commit(settings, running=running)
    finally:
        stats = running.close()

    topics = settings.topics
    scores = read_with_deserializer(settings, topics.fraud_scores)
    assert sorted(r["event_id"] for r in scores) == sorted(e["event_id"] for e in v1 + v2)
    recommendations = read_with_deserializer(settings, topics.recommendations)
    with_candidates = {e["event_id"] for e in v1 + v2 if e["candidates"]}
    assert {r["event_id"] for r in recommendations} == with_candidates
    dead = read_with_deserializer(settings, topics.dead_letter)
    assert sorted(r["error_kind"] for r in dead) == [
        "decode.incompatible_schema",
        "decode.unknown_schema_id",
    ]
    assert stats.dead_lettered == 2
    # The outputs' subjects hold our schemas, under the ids the outputs carry.
    for topic, name in pipeline_outputs(settings).items():
        latest = registry.get_latest_version(subject(topic))
        assert json.loads(latest.schema.schema_str)["name"] == schemas.raw(name)["name"]


def test_an_incompatible_schema_is_refused_by_the_registry_and_by_schemas_check(
    registry_settings, tmp_path, monkeypatch
):
    settings = registry_settings
    produce(settings, serializer(settings, schemas.raw(schemas.CLICK_EVENT)), events(5, 3))
    v3 = click_v3()
    with pytest.raises(Exception, match="409"):
        produce(settings, serializer(settings, v3), events(1, 4))

    monkeypatch.setenv("STREAMSCORE_SCHEMA_REGISTRY__URL", settings.schema_registry.url)
    monkeypatch.setenv("STREAMSCORE_KAFKA__BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers)
    topic = settings.topics.input
    for schema, code in ((v3, 1), (click_v2(), 0)):
        path = tmp_path / "candidate.avsc"
        path.write_text(json.dumps(schema))
        result = CliRunner().invoke(app, ["schemas", "check", str(path), "--topic", topic])
        assert result.exit_code == code, result.output
    listed = CliRunner().invoke(app, ["schemas", "list"])
    assert listed.exit_code == 0 and subject(topic) in listed.output


def test_an_incompatible_output_schema_fails_start_up_naming_the_subject(registry_settings):
    settings = registry_settings
    fraud_subject = subject(settings.topics.fraud_scores)
    older = {  # an older FraudScore without the fields ours requires: ours cannot read it
        "type": "record",
        "name": "FraudScore",
        "namespace": "streamscore",
        "fields": [{"name": "event_id", "type": "string"}],
    }
    from confluent_kafka.schema_registry import Schema

    client(settings).register_schema(fraud_subject, Schema(json.dumps(older), "AVRO"))
    with pytest.raises(IncompatibleSchema, match=fraud_subject):
        connect_catalog(settings.schema_registry, pipeline_outputs(settings))


def ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def metric(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def test_a_registry_restart_mid_stream_holds_the_input_loses_nothing_and_keeps_ids(
    registry_settings, schema_registry
):
    if schema_registry is None:
        pytest.skip("SCHEMA_REGISTRY_URL names an external registry: it cannot be restarted here")
    port = free_port()
    telemetry = registry_settings.telemetry.model_copy(update={"port": port})
    settings = registry_settings.model_copy(update={"telemetry": telemetry})
    registry = client(settings)
    first, held = events(200, seed=21), events(200, seed=22)
    produce(settings, serializer(settings, schemas.raw(schemas.CLICK_EVENT)), first)
    v2 = serializer(settings, click_v2())  # registered now, first used while the registry is down
    v2_context = SerializationContext(settings.topics.input, MessageField.VALUE)
    v2(held[0], v2_context)
    subjects = sorted(registry.get_subjects())

    running = Running(settings)
    try:
        # The pipeline has looked up v1 and registered its outputs.
        wait_for_commit(settings, running=running)
        ids_before = {
            name: [registry.get_version(name, v).schema_id for v in registry.get_versions(name)]
            for name in subjects + [subject(t) for t in pipeline_outputs(settings)]
        }
        schema_registry.down()
        produce(settings, v2, held)  # v2's id: not yet looked up by the pipeline
        deadline = time.monotonic() + 60
        while metric(port, "streamscore_schema_registry_unavailable_total") < 1:
            assert time.monotonic() < deadline, "the outage was not seen"
            time.sleep(0.5)
        assert not ready(port)
        assert metric(port, "streamscore_input_held") == 1
        schema_registry.up()
        wait_for_commit(settings, timeout_s=120, running=running)
        deadline = time.monotonic() + 30
        while not ready(port):
            assert time.monotonic() < deadline, "not ready again after the registry came back"
            time.sleep(0.5)
    finally:
        stats = running.close()

    assert stats.dead_lettered == 0
    scores = read_topic(settings, settings.topics.fraud_scores, schemas.FRAUD_SCORE)
    assert sorted(r["event_id"] for r, _ in scores) == sorted(e["event_id"] for e in first + held)
    fresh = client(settings)  # no cache: every id is asked of the restarted registry
    ids_after = {
        name: [fresh.get_version(name, v).schema_id for v in fresh.get_versions(name)]
        for name in ids_before
    }
    assert ids_after == ids_before

"""Privacy against the real broker: erasure requests reach state and its changelog across
restarts, and no raw personal data leaves the event and the dead-letter topic on any path.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
import uuid
import zlib
from dataclasses import asdict
from pathlib import Path

import pytest
import structlog
from confluent_kafka import Consumer, Producer

import schemas
from pipeline.kafka.admin import topic_partitions
from pipeline.kafka.clients import producer_config, reading_catalog
from pipeline.kafka.messages import read_messages
from pipeline.serve.events import ClickEvent
from pipeline.serve.features import compute_features, feature_digests
from pipeline.serve.forget import FORGET_POSITION, Forgetter, ensure_forget_topic, request_forget
from pipeline.serve.produce import FEATURES_HEADER, TIMING_HEADER
from pipeline.serve.state import UserTable
from pipeline.serve.state.changelog import changelog_topic, restore
from pipeline.serve.state.pseudonym import Pseudonyms
from pipeline.serve.state.reference import SESSION_EVENTS
from pipeline.tools.local_broker import REPO_ROOT, free_port
from pipeline.training.generator import GeneratorConfig, generate
from schemas.codec import Decoder, Encoder
from tests.engines.publish import publish_copy
from tests.integration.running import Running
from tests.integration.test_pipeline import produce_with_bad_input, wait_for_commit

pytestmark = pytest.mark.integration

# Distinctive values: any of them outside the input and the dead-letter topic is a leak.
DEVICE = "dev-PIISCAN-5e1d77"
IP = "198.51.100.201"
CARD = "card-PIISCAN-90ab13"
AGENT = "Mozilla/5.0 (PIISCAN-agent-4411; Android 14) Mobile"
PERSONAL = {"device_id": DEVICE, "ip": IP, "card_fingerprint": CARD, "user_agent": AGENT}


def raw_records(settings, topic):
    """(key, value, headers) of every committed record of `topic`."""
    return [(m.key(), m.value(), m.headers() or []) for m in read_messages(settings.kafka, topic)]


def events_of(users, count, seed):
    config = GeneratorConfig(events=count, users=50, seed=seed).anchored_before(time.time())
    out = []
    for i, (event, _) in enumerate(generate(config)):
        out.append(event | {"user_id": users[i % len(users)]})
    return out


def produce_events(settings, events):
    producer = Producer(producer_config(settings.kafka))
    encoder = Encoder(schemas.CLICK_EVENT)
    for event in events:
        producer.produce(
            settings.topics.input, key=event["user_id"].encode(), value=encoder.encode(event)
        )
    assert producer.flush(30) == 0


def wait_until(condition, what, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def tombstoned(settings, user):
    key = user.encode()
    records = raw_records(settings, changelog_topic(settings))
    return any(k == key and v is None for k, v, _ in records)


def test_a_forgotten_user_is_gone_from_state_and_changelog_and_comes_back_as_new(
    kafka_settings,
):
    with structlog.testing.capture_logs() as entries:
        _forget_two_users_and_check(kafka_settings, entries)


def _forget_two_users_and_check(kafka_settings, entries):
    processing = kafka_settings.processing.model_copy(update={"emit_features": True})
    settings = kafka_settings.model_copy(update={"processing": processing})
    users = ["alice-erase", "bob-erase", "carol-keep"]
    produce_events(settings, events_of(users, 90, seed=21))

    first = Running(settings)
    try:
        wait_for_commit(settings, running=first)
        # Forgotten while the pipeline runs: its owner drops alice between batches.
        request_forget(settings, "alice-erase")
        wait_until(lambda: tombstoned(settings, "alice-erase"), "alice's tombstone")
        alice_again = come_back(settings, "alice-erase", seed=22)
    finally:
        first.close()
    # Her next event is scored from empty state: the features of a new user.
    assert features_header(settings, "alice-erase-again") == fresh_digest(settings, alice_again)

    # Forgotten while no instance runs: the next owner applies it after its restore, and
    # does not apply alice's request again (she came back after it). The first instance
    # stopped cleanly, so the second restores from its snapshots, which still hold bob.
    request_forget(settings, "bob-erase")
    written = [e for e in entries if e["event"] == "snapshot_written"]
    assert {e["partition"] for e in written} == set(topic_partitions_of(settings))
    second = Running(settings)
    try:
        wait_until(lambda: tombstoned(settings, "bob-erase"), "bob's tombstone", timeout_s=120)
        bob_again = come_back(settings, "bob-erase", seed=23)
    finally:
        second.close()
    (restored,) = [e for e in entries if e["event"] == "state_restored" and e["records"]]
    assert restored["from_snapshot"] == restored["records"] == 3  # three users, no tail
    assert features_header(settings, "bob-erase-again") == fresh_digest(settings, bob_again)

    table = UserTable(settings.features.history_length)
    partitions = topic_partitions_of(settings)

    stats = restore(settings, table, partitions)
    held = {key for p in partitions for key in table.recency(p)}
    assert {b"alice-erase", b"bob-erase", b"carol-keep"} <= held
    for user in (b"alice-erase", b"bob-erase"):  # each holds only their event after erasure
        (partition,) = [p for p in partitions if user in table.recency(p)]
        assert table.columns.ints[table.slot_of(partition, user), SESSION_EVENTS] == 1
    positions = {stats.controls[p, FORGET_POSITION] for p in partitions}
    assert positions == {(2).to_bytes(8, "big")}  # both requests applied to every partition

    applied = [e for e in entries if e["event"] == "forget_applied" and e["held"]]
    assert len(applied) == 2, "one erasure record per forgotten user"
    for record in applied:
        assert record["requested_ms"] > 0 and len(record["subject"]) == 32
        assert "erase" not in json.dumps(record)  # the record names no user


def come_back(settings, user, seed):
    """One more event of `user` (event id `<user>-again`), produced and committed."""
    (event,) = events_of([user], 1, seed=seed)
    event["event_id"] = f"{user}-again"
    produce_events(settings, [event])
    wait_for_commit(settings)
    return event


def features_header(settings, event_id):
    """The feature digest header on the fraud score of `event_id`."""
    fraud = Decoder(schemas.FRAUD_SCORE, reading_catalog(settings.schema_registry))
    (headers,) = [
        dict(h)
        for _, value, h in raw_records(settings, settings.topics.fraud_scores)
        if fraud.decode(value)["event_id"] == event_id
    ]
    return headers[FEATURES_HEADER].decode()


def fresh_digest(settings, event):
    """The feature digest of `event` as a new user's first: from empty state."""
    features = settings.features
    fresh = compute_features([ClickEvent(**event)], features.history_length, features.session_gap_s)
    return feature_digests(fresh)[0]


def topic_partitions_of(settings):
    consumer = Consumer(settings.kafka.client_config() | {"group.id": "partitions"})
    try:
        return topic_partitions(consumer, settings.topics.input)
    finally:
        consumer.close()


def scrape(port: int, timeout_s: float = 60.0) -> bytes:
    """/metrics of an instance, once its server listens: an instance that joined late (a
    busy machine, kernels loading) may not listen yet when the commits the test waits for
    were the first instance's.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                body: bytes = reply.read()
                return body
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_an_assignment_of_no_partitions_asks_the_forget_topic_nothing(kafka_settings):
    # A cooperative rebalance may assign nothing, also while the consumer closes at stop.
    ensure_forget_topic(kafka_settings)
    forgetter = Forgetter(kafka_settings, UserTable(2), Pseudonyms.ephemeral())
    forgetter.close()
    forgetter.assigned([], {})  # its closed consumer raises if asked for the topic's end
    with pytest.raises(RuntimeError, match="closed"):
        forgetter.assigned([0], {})


def test_no_raw_personal_data_outside_the_input_and_the_dead_letter_topic(
    kafka_settings, model_dir, tmp_path, capfd
):
    """Valid events, every dead-letter reason, a rebalance, a model reload and both debug
    headers, in redact mode; then every log line, /metrics, the outputs with their headers,
    the changelog's bytes, the dead-letter topic and files written under var/ are scanned.
    """
    started = time.time()
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    var_out = REPO_ROOT / "var" / "test-privacy" / uuid.uuid4().hex[:8]
    settings = kafka_settings.model_copy(
        update={
            "processing": kafka_settings.processing.model_copy(
                update={"emit_features": True, "emit_timing": True}
            ),
            "engine": kafka_settings.engine.model_copy(
                update={"model_dir": models, "reload_interval_s": 0.2}
            ),
            "privacy": kafka_settings.privacy.model_copy(update={"dead_letter_payload": "redact"}),
        }
    )
    config = GeneratorConfig(events=600, users=30, seed=9).anchored_before(time.time())
    marked = [(event | PERSONAL, label) for event, label in generate(config)]
    expected_dead, _ = produce_with_bad_input(settings, marked)

    def instance():
        port = free_port()
        telemetry = settings.telemetry.model_copy(update={"port": port})
        return Running(settings.model_copy(update={"telemetry": telemetry})), port

    metrics = []
    first, first_port = instance()
    second = None
    try:
        wait_for_commit(settings, running=first)
        publish_copy(models, "fraud")  # a reload while running
        second, second_port = instance()  # a rebalance
        more = GeneratorConfig(events=300, users=30, seed=10).anchored_before(time.time())
        produce_with_bad_input(settings, [(e | PERSONAL, label) for e, label in generate(more)])
        wait_for_commit(settings, timeout_s=120, running=first)
        second.check()
        metrics = [scrape(port) for port in (first_port, second_port)]
    finally:
        if second is not None:
            second.close()
        stats = first.close()
    var_out.mkdir(parents=True)
    (var_out / "stats.json").write_text(json.dumps(asdict(stats)))  # a run's file under var/

    logs = capfd.readouterr()
    text = (logs.out + logs.err).encode()
    for event in ("model_swapped", "partitions_revoked", "state_restored"):
        assert event.encode() in text, f"the {event} path was not exercised"
    scores = raw_records(settings, settings.topics.fraud_scores)
    recommendations = raw_records(settings, settings.topics.recommendations)
    header_names = {name for _, _, headers in scores for name, _ in headers}
    assert {FEATURES_HEADER, TIMING_HEADER} <= header_names
    dead = raw_records(settings, settings.topics.dead_letter)
    dead_reader = Decoder(schemas.DEAD_LETTER, reading_catalog(settings.schema_registry))
    reasons = {dead_reader.decode(value)["error_kind"] for _, value, _ in dead}
    assert reasons == {kind for _, _, kind in expected_dead}
    changelog = raw_records(settings, changelog_topic(settings))
    assert changelog, "the changelog was written"

    blobs: dict[str, bytes] = {"logs": text, "metrics": b"".join(metrics)}
    for name, records in (
        ("fraud scores", scores),
        ("recommendations", recommendations),
        ("changelog", changelog),
        ("dead letters (redact)", dead),
    ):
        blobs[name] = b"".join(
            (k or b"") + (v or b"") + b"".join(n.encode() + (h or b"") for n, h in headers)
            for k, v, headers in records
        )
    for path in (REPO_ROOT / "var").rglob("*"):
        written = path.is_file() and path.stat().st_mtime >= started
        if written and not _broker_data(path) and path.stat().st_size < 64 * 2**20:
            blobs[str(path)] = path.read_bytes()
    assert any(str(var_out) in name for name in blobs)
    key = settings.privacy.secret().decode()
    for value in [*PERSONAL.values(), key]:
        for name, blob in blobs.items():
            assert value.encode() not in blob, f"{value[:6]!r}... found in {name}"
    # The state keeps pseudonyms, not an unkeyed hash anyone could invert.
    unkeyed = zlib.crc32(IP.encode()).to_bytes(4, "little")
    assert unkeyed not in blobs["changelog"]
    shutil.rmtree(var_out)


def _broker_data(path: Path) -> bool:
    """The dev broker's and registry's own data under var/: a copy of the topics."""
    parts = path.relative_to(REPO_ROOT / "var").parts
    return parts[0] in {"kafka", "registry"}

"""Fault injection on the real broker: kill -9, scaling 1→2→1, a broker restart.

Pipelines run as `streamscore run` processes with `processing.emit_features` on, so every
fraud score carries a digest of the features it was computed from. The reference is the
pure offline feature function over the same event log; every output must match it.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

import schemas
from pipeline.codec import Decoder, Encoder
from pipeline.events import ClickEvent
from pipeline.features import compute_features, feature_digests
from pipeline.generator import GeneratorConfig, generate
from pipeline.kafka.admin import committed_offsets, end_offsets
from pipeline.kafka.clients import producer_config
from pipeline.settings import Settings, settings_env
from pipeline.sink import FEATURES_HEADER
from tests.integration.test_pipeline import wait_for_commit

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 6000
PRODUCE_S = 12.0  # the input arrives over this long, so every fault lands mid-stream


class PipelineProcess:
    """One `streamscore run` process of the test's consumer group."""

    def __init__(self, settings: Settings, instance: str, log_dir: Path) -> None:
        consumer = settings.consumer.model_copy(update={"instance_id": instance})
        env = os.environ | settings_env(settings.model_copy(update={"consumer": consumer}))
        self.log_path = log_dir / f"pipeline-{instance}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run"],
            env=env | {"STREAMSCORE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_for_log(self, event: str, timeout_s: float = 120) -> None:
        """Until the process has logged `event` (it logs unbuffered)."""
        deadline = time.monotonic() + timeout_s
        while f'"{event}"' not in self.log_path.read_text():
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {event} in {timeout_s}s"
            time.sleep(0.1)

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                raise
        assert self.process.returncode == 0, self.log_path.read_text()[-3000:]


def fault_settings(
    kafka_settings: Settings, guarantee: str, session_timeout_ms: int = 10_000
) -> Settings:
    """Small batches so faults land mid-stream. Static members that stop cleanly do not leave
    the group, so a short session timeout hands their partitions over sooner. Inference runs
    on its own thread (the GPU default), so rebalances and rollbacks meet batches in flight.
    """
    return kafka_settings.model_copy(
        update={
            "consumer": kafka_settings.consumer.model_copy(
                update={"max_batch": 100, "session_timeout_ms": session_timeout_ms}
            ),
            "processing": kafka_settings.processing.model_copy(
                update={"guarantee": guarantee, "emit_features": True, "inference_depth": 1}
            ),
        }
    )


class Producing:
    """Writes the test's events to the input evenly over `PRODUCE_S` seconds, on a thread:
    the pipeline is faster than any fixed backlog, so only a stream that is still arriving
    makes a fault land mid-stream whatever the machine.
    """

    def __init__(self, settings: Settings) -> None:
        config = GeneratorConfig(events=EVENTS, users=120, seed=21).anchored_before(time.time())
        self.events = [event for event, _ in generate(config)]
        self._settings = settings
        self._unacknowledged = -1
        self._thread = threading.Thread(target=self._run, name="producing")
        self._thread.start()

    def _run(self) -> None:
        encoder = Encoder(schemas.CLICK_EVENT)
        producer = Producer(producer_config(self._settings))  # idempotent: keeps the order
        started = time.monotonic()
        for i, event in enumerate(self.events):
            due = started + PRODUCE_S * i / len(self.events)
            time.sleep(max(0.0, due - time.monotonic()))
            key, value = event["user_id"].encode(), encoder.encode(event)
            producer.produce(self._settings.topics.input, key=key, value=value)
            producer.poll(0)
        self._unacknowledged = producer.flush(120)

    def join(self) -> list[dict]:
        """Wait until every event is written; return them in production order."""
        self._thread.join()
        assert self._unacknowledged == 0, f"{self._unacknowledged} test events not written"
        return self.events


def reference_digests(settings: Settings, events: list[dict]) -> dict[str, str]:
    """Digests of the offline features: a user's events stay in order within a partition."""
    batch = compute_features(
        [ClickEvent(**event) for event in events],
        settings.features.history_length,
        settings.features.session_gap_s,
        allowed_lateness_s=settings.features.allowed_lateness_s,
    )
    return dict(zip((e["event_id"] for e in events), feature_digests(batch), strict=True))


def committed_fraction(settings: Settings) -> float:
    """How much of all the test's events the group has committed."""
    consumer = Consumer(settings.kafka.client_config() | {"group.id": settings.consumer.group_id})
    try:
        ends = end_offsets(consumer, settings.topics.input)
        done = committed_offsets(consumer, settings.topics.input, ends)
        return sum(done.values()) / EVENTS
    except KafkaException:  # the group's coordinator is still being elected
        return 0.0
    finally:
        consumer.close()


def wait_for_progress(settings: Settings, fraction: float, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while committed_fraction(settings) < fraction:
        if time.monotonic() > deadline:
            raise AssertionError(f"less than {fraction:.0%} committed after {timeout_s}s")
        time.sleep(0.1)


def read_scores(settings: Settings) -> list[tuple[str, str]]:
    """(event_id, feature digest) of every committed fraud score."""
    decoder = Decoder(schemas.FRAUD_SCORE)
    topic = settings.topics.fraud_scores
    consumer = Consumer(
        settings.kafka.client_config()
        | {
            "group.id": f"reader-{time.monotonic_ns()}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        ends = end_offsets(consumer, topic)
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        pending, found = set(ends), []
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                if message.error() is not None:
                    pending.discard(message.partition())
                    continue
                headers = dict(message.headers() or [])
                record = decoder.decode(message.value())
                found.append((record["event_id"], headers[FEATURES_HEADER].decode()))
        assert not pending, f"partitions {pending} not read to their end"
        return found
    finally:
        consumer.close()


def check_outputs(settings: Settings, events: list[dict], exactly_once: bool) -> None:
    scores = read_scores(settings)
    counts = Counter(event_id for event_id, _ in scores)
    assert set(counts) == {e["event_id"] for e in events}, "an input event has no output"
    if exactly_once:
        assert max(counts.values()) == 1, counts.most_common(3)
    reference = reference_digests(settings, events)
    wrong = [(eid, digest) for eid, digest in scores if digest != reference[eid]]
    assert not wrong, f"{len(wrong)} outputs differ from the reference, e.g. {wrong[:3]}"


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_kill_9_mid_stream_then_restart(kafka_settings, guarantee, tmp_path):
    settings = fault_settings(kafka_settings, guarantee)
    producing = Producing(settings)
    first = PipelineProcess(settings, "p0", tmp_path)
    try:
        wait_for_progress(settings, 0.3)
    finally:
        first.kill9()
    assert committed_fraction(settings) < 1.0, "the kill came too late to test anything"
    second = PipelineProcess(settings, "p0", tmp_path)
    try:
        events = producing.join()
        wait_for_commit(settings, timeout_s=180)
    finally:
        second.stop()
    check_outputs(settings, events, exactly_once=guarantee == "exactly_once")


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_scale_one_to_two_to_one(kafka_settings, guarantee, tmp_path):
    settings = fault_settings(kafka_settings, guarantee)
    producing = Producing(settings)
    a = PipelineProcess(settings, "a", tmp_path)
    b = None
    try:
        wait_for_progress(settings, 0.15)
        b = PipelineProcess(settings, "b", tmp_path)  # takes over partitions and their state
        b.wait_for_log("state_restored")
        assert committed_fraction(settings) < 0.9, "b joined too late to share the stream"
        wait_for_progress(settings, 0.6)
        a.stop()  # b takes everything back
        events = producing.join()
        wait_for_commit(settings, timeout_s=180)
    finally:
        a.process.poll() is None and a.kill9()
        if b is not None:
            b.stop()
    check_outputs(settings, events, exactly_once=guarantee == "exactly_once")
    logs = "".join(p.read_text() for p in tmp_path.glob("pipeline-b-*.log"))
    assert '"state_restored"' in logs and '"partitions_assigned"' in logs


def test_broker_restart_mid_stream(kafka_settings, kafka_broker, tmp_path):
    if kafka_broker is None:
        pytest.skip("KAFKA_BOOTSTRAP_SERVERS points at a broker this test cannot restart")
    # The session must outlast the restart (about 10 s here), or the member is fenced.
    settings = fault_settings(kafka_settings, "at_least_once", session_timeout_ms=45_000)
    producing = Producing(settings)
    pipeline = PipelineProcess(settings, "p0", tmp_path)
    try:
        wait_for_progress(settings, 0.3)
        kafka_broker.down()
        time.sleep(2)
        kafka_broker.up()
        events = producing.join()
        wait_for_commit(settings, timeout_s=180)
    finally:
        pipeline.stop()
    check_outputs(settings, events, exactly_once=False)

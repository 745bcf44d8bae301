"""Fault injection on the real broker: kill -9, scaling 1→2→1, a broker restart.

Pipelines run as `streamscore run` processes with `processing.emit_features` on, so every
fraud score carries a digest of the features it was computed from. The reference is the
pure offline feature function over the same event log; every output must match it.

No step depends on how fast this machine is: production starts once the first process owns
its partitions, and it holds part of the stream back until the fault has landed, so each
fault lands mid-stream on an idle machine and on a busy one alike.
"""

import json
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
from confluent_kafka.admin import AdminClient, NewTopic

import schemas
from pipeline.kafka.admin import TopicNotReady, committed_offsets, end_offsets
from pipeline.kafka.clients import producer_config
from pipeline.serve.commit import ExactlyOnce, Rewind
from pipeline.serve.events import ClickEvent
from pipeline.serve.features import compute_features, feature_digests
from pipeline.serve.produce import FEATURES_HEADER, Sink
from pipeline.settings import Settings, settings_env
from pipeline.training.generator import GeneratorConfig, generate
from schemas.codec import Decoder, Encoder
from tests.integration.test_pipeline import wait_for_commit

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 6000
PRODUCE_S = 12.0  # the input arrives over this long, apart from the hold (see Producing)


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

    def logged(self, event: str) -> list[dict]:
        """The JSON log records named `event` so far (the process logs unbuffered)."""
        records = []
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a partial last line, or a library's plain text
                continue
            if isinstance(record, dict) and record.get("event") == event:
                records.append(record)
        return records

    def wait_until_owning(self, timeout_s: float = 120) -> None:
        """Until the process has restored the state of at least one partition it was given:
        with cooperative rebalancing, a joining member's first assignment can be empty.
        """
        deadline = time.monotonic() + timeout_s
        while not any(r["partitions"] for r in self.logged("state_restored")):
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, (
                f"{self.log_path.name}: no state_restored with partitions in {timeout_s}s"
            )
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
    on its own thread (the default, set here all the same), so rebalances and rollbacks meet
    batches in flight.
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
    """Writes the test's events to the input on a thread, evenly over `PRODUCE_S` seconds,
    but holds back those after `HELD_FROM` until `release()`.

    The pipeline is faster than any fixed backlog, so only a stream that is still arriving
    makes a fault land mid-stream; the hold keeps it arriving however slowly the machine
    starts processes, so a fault injected before `release()` always has input after it.
    """

    HELD_FROM = 0.7

    def __init__(self, settings: Settings) -> None:
        config = GeneratorConfig(events=EVENTS, users=120, seed=21).anchored_before(time.time())
        self.events = [event for event, _ in generate(config)]
        self._settings = settings
        self._released = threading.Event()
        self._unacknowledged = -1
        self._thread = threading.Thread(target=self._run, name="producing", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Producing":
        return self

    def __exit__(self, *_: object) -> None:
        """A failed test releases the hold, so the thread ends."""
        self.release()
        self._thread.join(150)

    def release(self) -> None:
        """Let the held-back rest of the stream go."""
        self._released.set()

    def _run(self) -> None:
        encoder = Encoder(schemas.CLICK_EVENT)
        producer = Producer(producer_config(self._settings.kafka))  # idempotent: keeps the order
        held_from = int(len(self.events) * self.HELD_FROM)
        started = time.monotonic()
        for i, event in enumerate(self.events):
            if i == held_from:
                producer.flush(120)
                self._released.wait()
                started = time.monotonic() - PRODUCE_S * i / len(self.events)
            due = started + PRODUCE_S * i / len(self.events)
            time.sleep(max(0.0, due - time.monotonic()))
            key, value = event["user_id"].encode(), encoder.encode(event)
            producer.produce(self._settings.topics.input, key=key, value=value)
            producer.poll(0)
        self._unacknowledged = producer.flush(120)

    def join(self) -> list[dict]:
        """Release the rest, wait until every event is written; return them in order."""
        self.release()
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
    except (KafkaException, TopicNotReady):  # a coordinator or leaders being elected
        return 0.0
    finally:
        consumer.close()


def wait_for_progress(settings: Settings, fraction: float, timeout_s: float = 120) -> None:
    assert fraction < Producing.HELD_FROM, "that much is held back until release()"
    deadline = time.monotonic() + timeout_s
    while (done := committed_fraction(settings)) < fraction:
        if time.monotonic() > deadline:
            raise AssertionError(f"{done:.0%} committed after {timeout_s}s, {fraction:.0%} wanted")
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


def start_owning(settings: Settings, instance: str, log_dir: Path) -> PipelineProcess:
    """A pipeline process that already owns partitions: one that is still importing when the
    stream starts would find the held part of it waiting, and miss the stream's middle.
    """
    process = PipelineProcess(settings, instance, log_dir)
    process.wait_until_owning()
    return process


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_kill_9_mid_stream_then_restart(kafka_settings, guarantee, tmp_path):
    settings = fault_settings(kafka_settings, guarantee)
    first = start_owning(settings, "p0", tmp_path)
    with Producing(settings) as producing:
        try:
            wait_for_progress(settings, 0.3)
        finally:
            first.kill9()  # while events arrive, or with the held rest still to come
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
    a = start_owning(settings, "a", tmp_path)
    b = None
    with Producing(settings) as producing:
        try:
            wait_for_progress(settings, 0.15)
            b = PipelineProcess(settings, "b", tmp_path)  # takes partitions and their state
            b.wait_until_owning()
            producing.release()
            wait_for_progress(settings, Producing.HELD_FROM - 0.05)
            a.stop()  # b takes everything back, while the released rest arrives
            events = producing.join()
            wait_for_commit(settings, timeout_s=180)
        finally:
            a.process.poll() is None and a.kill9()
            if b is not None:
                b.stop()
    check_outputs(settings, events, exactly_once=guarantee == "exactly_once")
    # b restored state twice: its share when it joined, then a's partitions when a left.
    restores = [r for r in b.logged("state_restored") if r["partitions"]]
    restored = [set(r["partitions"]) for r in restores]
    assert len(restored) >= 2, restored
    assert set().union(*restored) == set(range(settings.topics.partitions)), restored
    # a gave its partitions up cleanly each time, so b started from a's snapshots (and the
    # outputs above matched the reference all the same).
    assert sum(r["from_snapshot"] for r in restores) > 0, restores
    assert a.logged("snapshot_written"), "a left no snapshot"


def test_broker_restart_mid_stream(kafka_settings, kafka_broker, tmp_path):
    if kafka_broker is None:
        pytest.skip("KAFKA_BOOTSTRAP_SERVERS points at a broker this test cannot restart")
    # The session must outlast the restart (about 10 s here), or the member is fenced.
    settings = fault_settings(kafka_settings, "at_least_once", session_timeout_ms=45_000)
    pipeline = start_owning(settings, "p0", tmp_path)
    with Producing(settings) as producing:
        try:
            wait_for_progress(settings, 0.3)
            kafka_broker.down()
            time.sleep(2)  # the outage itself: both clients see the broker gone
            kafka_broker.up()
            events = producing.join()
            wait_for_commit(settings, timeout_s=180)
        finally:
            pipeline.stop()
    check_outputs(settings, events, exactly_once=False)


def test_a_transaction_holding_a_record_the_broker_refuses_is_rolled_back(kafka_settings):
    # Exactly-once produces without a delivery callback per record (produce.Sink(track=False)):
    # it relies on the commit failing, abortably, when any record of the transaction failed.
    # The broker refuses a record larger than the topic's max.message.bytes (compressed).
    topic = f"{kafka_settings.topics.fraud_scores}.small"
    admin = AdminClient(kafka_settings.kafka.client_config())
    new = NewTopic(topic, 1, 1, config={"max.message.bytes": "1000"})
    admin.create_topics([new])[topic].result()
    transactional_id = f"{kafka_settings.consumer.group_id}.refused"
    checkpoint = ExactlyOnce(
        consumer=None,  # no offsets: never asked for its group metadata
        make_producer=lambda: Producer(
            producer_config(
                kafka_settings.kafka,
                transactional_id,
                kafka_settings.processing.transaction_timeout_ms,
            )
        ),
        make_sink=lambda producer: Sink(
            producer, kafka_settings.topics, "changelog", {topic: 1}, track=False
        ),
        take_changes=list,  # no state here
    )
    try:
        checkpoint.begin_batch()
        checkpoint.sink.publish_records(topic, [(b"k", os.urandom(5000))])  # lz4 cannot shrink it
        checkpoint.end_batch({}, [])  # interval 0: the commit starts
        with pytest.raises(Rewind):
            checkpoint.commit()  # waits for it
        # As the pipeline does after a Rewind: the batch again, in a new transaction. The
        # first may fail too (the refused record took a sequence number: librdkafka bumps
        # the producer epoch after that abort); nothing of an aborted one is read.
        for _ in range(3):
            checkpoint.begin_batch()
            checkpoint.sink.publish_records(topic, [(b"k", b"small")])
            checkpoint.end_batch({}, [])
            try:
                checkpoint.commit()
                break
            except Rewind:
                continue
        else:
            pytest.fail("no transaction committed after the refused record's")
    finally:
        checkpoint.close()
    assert committed_values(kafka_settings, topic, 1) == [b"small"]


def test_a_fenced_transactional_producer_is_released_and_replaced(kafka_settings):
    # A newer producer with the same transactional id fences this one: its commit fails
    # fatally. The checkpoint must rewind (not raise the Kafka error), close the fenced
    # producer, whose flush raises, and commit the next transaction on a new one. Which
    # call finds the fence is a race: the batch's end when the queued record went out after
    # the fence (its failed delivery is raised by the sink's poll), else the commit.
    topic = kafka_settings.topics.fraud_scores
    transactional_id = f"{kafka_settings.consumer.group_id}.fenced"
    made: list[Producer] = []
    newer = Producer(
        producer_config(
            kafka_settings.kafka, transactional_id, kafka_settings.processing.transaction_timeout_ms
        )
    )

    def make_producer() -> Producer:
        made.append(
            Producer(
                producer_config(
                    kafka_settings.kafka,
                    transactional_id,
                    kafka_settings.processing.transaction_timeout_ms,
                )
            )
        )
        return made[-1]

    checkpoint = ExactlyOnce(
        consumer=None,  # no offsets: never asked for its group metadata
        make_producer=make_producer,
        make_sink=lambda producer: Sink(
            producer, kafka_settings.topics, "changelog", {topic: 3}, track=False
        ),
        take_changes=list,
    )
    try:
        checkpoint.begin_batch()
        checkpoint.sink.publish_records(topic, [(b"k", b"fenced")])
        newer.init_transactions(30)  # fences the checkpoint's producer
        with pytest.raises(Rewind):
            checkpoint.end_batch({}, [])
            checkpoint.commit()
        assert len(made) == 2
        with pytest.raises(RuntimeError, match="closed"):
            made[0].flush(0)  # released, not left running beside its successor
        checkpoint.begin_batch()  # the new producer fenced `newer` in turn
        checkpoint.sink.publish_records(topic, [(b"k", b"after")])
        checkpoint.end_batch({}, [])
        checkpoint.commit()
    finally:
        checkpoint.close()
        Sink(newer, kafka_settings.topics, "changelog", {}).close(timeout_s=0)  # fenced too
    assert committed_values(kafka_settings, topic, 3) == [b"after"]


def committed_values(settings: Settings, topic: str, partitions: int) -> list[bytes | None]:
    """The values a read_committed reader finds in `topic` (waiting up to 30 s for one)."""
    reader = Consumer(
        settings.kafka.client_config()
        | {"group.id": f"{topic}.reader", "isolation.level": "read_committed"}
    )
    reader.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    values: list[bytes | None] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not values:
        values += [m.value() for m in reader.consume(10, 1.0) if m.error() is None]
    reader.close()
    return values

"""Exactly-once on the local 3-node cluster (issue #48): every topic replicated, no
transactional call that waits without a bound when its coordinator does not answer, and a
fenced producer that is closed once, never called again.
"""

import signal
import threading
import time
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from pipeline.kafka.admin import watermarks
from pipeline.kafka.clients import producer_config
from pipeline.kafka.errors import kafka_error
from pipeline.serve.commit import ExactlyOnce, Rewind, TransactionsFailed
from pipeline.serve.produce import Sink
from pipeline.serve.state.changelog import ensure_changelog
from pipeline.settings import Settings
from pipeline.tools import chaos
from pipeline.tools.local_broker import LocalCluster
from pipeline.topics import pipeline_topics
from tests.integration.test_faults import committed_values

BOUND_S = 3.0  # the tests' transaction_call_timeout: each call gives up after this


def test_every_topic_streamscore_creates_is_replicated_three_times(cluster_settings):
    changelog = ensure_changelog(cluster_settings)
    admin = AdminClient(cluster_settings.kafka.client_config())
    names = [*pipeline_topics(cluster_settings), changelog]
    for name in names:
        assert replication_of(admin, name) == {3}, name
    for name in names:
        assert topic_config(admin, name)["min.insync.replicas"].value == "2", name


def replication_of(admin: AdminClient, topic: str, timeout_s: float = 30) -> set[int]:
    """The replica counts of `topic`'s partitions, once the answering broker knows it (a
    broker's metadata learns of a new topic a moment after the one that created it).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        found = admin.list_topics(topic, timeout=10).topics.get(topic)
        if found is not None and found.error is None and found.partitions:
            return {len(p.replicas) for p in found.partitions.values()}
        assert time.monotonic() < deadline, f"{topic} unknown after {timeout_s:.0f} s"
        time.sleep(0.2)


def topic_config(admin: AdminClient, topic: str, timeout_s: float = 30) -> dict[str, Any]:
    """`topic`'s configuration. A broker's metadata learns of a new topic a moment after the
    one that created it: until then it answers UNKNOWN_TOPIC_OR_PART.
    """
    deadline = time.monotonic() + timeout_s
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    while True:
        try:
            config: dict[str, Any] = admin.describe_configs([resource])[resource].result()
            return config
        except KafkaException as exc:
            unknown = kafka_error(exc).code() == KafkaError.UNKNOWN_TOPIC_OR_PART
            if not unknown or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_commit_whose_coordinator_does_not_answer_gives_up_within_the_bound(
    cluster_settings, kafka_cluster
):
    # Issue #48: "Timed out EndTxnRequest in flight", then the instance was silent until
    # max.poll.interval.ms expelled it. With the transaction coordinator and one more node
    # stopped (no quorum, no ISR), every call must give up at its bound: the commit, then
    # the abort, then a new producer's init, which ends exactly-once in this process
    # (TransactionsFailed: the CLI exits 3 for a supervisor's restart). The restart commits,
    # and the stuck transaction's record is never read.
    topic = cluster_settings.topics.fraud_scores
    transactional_id = f"{cluster_settings.consumer.group_id}.stalled"
    checkpoint = exactly_once(cluster_settings, transactional_id, topic, BOUND_S)
    stopped = [coordinator(kafka_cluster, transactional_id)]
    stopped.append(next(n for n in kafka_cluster.running() if n not in stopped))
    raised: list[BaseException] = []
    try:
        checkpoint.begin_batch()
        checkpoint.sink.publish_records(topic, [(b"k", b"stuck")])
        for node in stopped:
            kafka_cluster.node(node).signal(signal.SIGSTOP)
        started = time.monotonic()
        committing = threading.Thread(target=commit_into, args=(checkpoint, raised))
        committing.start()
        committing.join(6 * BOUND_S + 15)  # commit, abort, init, each bounded, and grace
        assert not committing.is_alive(), "a transactional call waited past its bound"
        assert len(raised) == 1 and isinstance(raised[0], TransactionsFailed), raised
        elapsed = time.monotonic() - started
    finally:
        for node in stopped:
            kafka_cluster.node(node).signal(signal.SIGCONT)
    assert elapsed < 6 * BOUND_S + 10
    checkpoint.close()  # nothing left to touch: returns without raising
    restarted = exactly_once(cluster_settings, transactional_id, topic, 60)
    try:
        restarted.begin_batch()
        restarted.sink.publish_records(topic, [(b"k", b"after")])
        restarted.end_batch({}, [])
        restarted.commit()
    finally:
        restarted.close()
    assert committed_values(cluster_settings, topic, 3) == [b"after"]


def test_a_fenced_producer_is_closed_once_and_never_called_again(cluster_settings):
    # Issue #48: the abort of a fenced producer raised, the loop stopped, the checkpoint
    # closed the producer, and the consumer's close then revoked the partitions, whose
    # commit called the closed producer ("RuntimeError: Producer has been closed").
    topic = cluster_settings.topics.fraud_scores
    transactional_id = f"{cluster_settings.consumer.group_id}.fenced"
    checkpoint = exactly_once(cluster_settings, transactional_id, topic, 30)
    newer = Producer(
        producer_config(
            cluster_settings.kafka,
            transactional_id,
            cluster_settings.processing.transaction_timeout_ms,
        )
    )
    try:
        checkpoint.begin_batch()
        checkpoint.sink.publish_records(topic, [(b"k", b"fenced")])
        checkpoint.sink.flush(10)  # in the transaction on the broker before the fence
        newer.init_transactions(30)  # fences the checkpoint's producer
        checkpoint.close()  # its abort is refused (fenced): the close goes on regardless
        with pytest.raises(Rewind):  # the revoke in the consumer's close
            checkpoint.commit([TopicPartition(cluster_settings.topics.input, 0)])
        with pytest.raises(Rewind):  # a loss
            checkpoint.forget([TopicPartition(cluster_settings.topics.input, 0)])
        newer.begin_transaction()
        newer.produce(topic, b"newer", b"k")
        newer.commit_transaction(30)
    finally:
        Sink(newer, cluster_settings.topics, "changelog", {}).close(timeout_s=5)
    assert committed_values(cluster_settings, topic, 3) == [b"newer"]


def exactly_once(
    settings: Settings, transactional_id: str, topic: str, bound_s: float
) -> ExactlyOnce:
    """A checkpoint with no consumer (no input offsets) writing to `topic`."""
    return ExactlyOnce(
        consumer=None,  # type: ignore[arg-type]  # no offsets: never asked for its metadata
        make_producer=lambda: Producer(
            producer_config(
                settings.kafka, transactional_id, settings.processing.transaction_timeout_ms
            )
        ),
        make_sink=lambda producer: Sink(
            producer, settings.topics, "changelog", {topic: 3}, track=False
        ),
        take_changes=list,  # no state here
        call_timeout_s=bound_s,
    )


def commit_into(checkpoint: ExactlyOnce, raised: list[BaseException]) -> None:
    """End the batch (the commit starts) and wait for the commit; keep what it raised."""
    try:
        checkpoint.end_batch({}, [])
        checkpoint.commit()
    except BaseException as exc:
        raised.append(exc)


def coordinator(cluster: LocalCluster, transactional_id: str) -> int:
    """The node coordinating `transactional_id`'s transactions now."""
    nodes = [node.node_id for node in cluster.nodes]
    found = chaos.coordinator(cluster.bootstrap, chaos.TRANSACTIONS_TOPIC, transactional_id, nodes)
    assert found is not None, "no leader for the transactional id's partition"
    return found


def test_a_partition_end_asked_while_its_leader_dies_is_asked_again_until_a_new_one_answers(
    cluster_settings, kafka_cluster
):
    # Found by `streamscore chaos` (seed 1): instances that started while a node was down
    # or stopped exited 1 at start, the forget tailer's end offset (ListOffsets) refused
    # with "Broker handle destroyed without termination" (_DESTROY_BROKER), or by a client
    # whose metadata did not hold the partition yet (_UNKNOWN_PARTITION), neither asked
    # again. With RF 3 another replica leads within the controller's session timeout,
    # inside the call's 30 s.
    topic = cluster_settings.topics.forget
    config = cluster_settings.kafka.client_config() | {"group.id": "watermarks"}
    connected = Consumer(config)
    admin = AdminClient(cluster_settings.kafka.client_config())
    try:
        assert watermarks(connected, topic, 0, timeout_s=30) == (0, 0)
        leader = admin.list_topics(topic, timeout=30).topics[topic].partitions[0].leader
        kafka_cluster.node(leader).signal(signal.SIGKILL)
        fresh = Consumer(config)  # a process starting now
        try:
            assert watermarks(fresh, topic, 0, timeout_s=30) == (0, 0)
            assert watermarks(connected, topic, 0, timeout_s=30) == (0, 0)
        finally:
            fresh.close()
            kafka_cluster.up()  # restarts the killed node, waits until it registered
    finally:
        connected.close()

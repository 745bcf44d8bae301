"""Topic metadata: a topic is read only once the broker's metadata shows it whole."""

import subprocess
import sys
import uuid
from types import SimpleNamespace

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka.admin import ConfigResource

from pipeline.kafka.admin import TopicNotReady, admin_client, topic_partitions, watermarks
from pipeline.topics import create_topics


def topic(partitions, error=None, leader=1):
    metas = {p: SimpleNamespace(leader=leader, error=None) for p in range(partitions)}
    return SimpleNamespace(error=error, partitions=metas)


class Metadata:
    """A client whose metadata answers come from a list, the last one repeated."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.reads = 0

    def list_topics(self, name, timeout):
        answer = self.answers[min(self.reads, len(self.answers) - 1)]
        self.reads += 1
        return SimpleNamespace(topics={} if answer is None else {name: answer})


def test_partitions_are_read_once_the_topic_is_whole():
    client = Metadata(
        None,
        topic(0, error=KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)),
        topic(3, leader=-1),
        topic(2),
        topic(3),
    )
    assert topic_partitions(client, "t", timeout_s=10, expected=3) == [0, 1, 2]
    assert client.reads == 5


def test_a_topic_that_never_becomes_whole_fails_with_its_name_and_why():
    client = Metadata(topic(0, error=KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)))
    with pytest.raises(TopicNotReady, match=r"topic 'orders' not ready after 0s: .*Unknown topic"):
        topic_partitions(client, "orders", timeout_s=0.3)
    assert client.reads > 1


@pytest.mark.integration
class Watermarks:
    """A client whose watermark answers come from a list: an error code, or (low, high)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.asked = 0
        self.refreshed = 0  # metadata requests between tries

    def list_topics(self, topic, timeout):
        self.refreshed += 1

    def get_watermark_offsets(self, partition, timeout):
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        if isinstance(answer, int):
            raise KafkaException(KafkaError(answer))
        return answer


def test_watermarks_are_asked_again_while_a_leader_settles():
    settling = Watermarks(
        KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, (3, 42)
    )
    assert watermarks(settling, "t", 0, timeout_s=5) == (3, 42)
    assert settling.asked == 3 and settling.refreshed == 2


def test_watermarks_are_asked_again_while_the_leaders_broker_is_gone():
    # The chaos run: a process starting while a node was down (tests/integration/
    # test_cluster.py reproduces it on the cluster).
    gone = Watermarks(
        KafkaError._DESTROY_BROKER,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        (0, 7),
    )
    assert watermarks(gone, "t", 0, timeout_s=5) == (0, 7)
    assert gone.asked == 5


def test_watermarks_raise_other_errors_and_a_leader_that_never_settles():
    denied = Watermarks(KafkaError.TOPIC_AUTHORIZATION_FAILED, (0, 1))
    with pytest.raises(KafkaException):
        watermarks(denied, "t", 0, timeout_s=5)
    assert denied.asked == 1
    never = Watermarks(KafkaError.NOT_LEADER_FOR_PARTITION)
    with pytest.raises(KafkaException):
        watermarks(never, "t", 0, timeout_s=0.3)
    assert never.asked > 1


def test_created_topics_are_whole_to_a_fresh_reader_on_a_busy_machine(kafka_settings):
    # One core kept busy: before create_topics waited, most single metadata reads right
    # after creation found the topic unknown (29 of 40 when measured).
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        run = uuid.uuid4().hex[:8]
        names = [f"whole-{run}-{i}" for i in range(10)]
        settings = kafka_settings.model_copy(
            update={"topics": kafka_settings.topics.model_copy(update={"partitions": 6})}
        )
        assert create_topics(settings, names) == names
        reader = Consumer(settings.kafka.client_config() | {"group.id": f"reader-{run}"})
        try:
            for name in names:
                found = reader.list_topics(name, timeout=10).topics[name]
                assert found.error is None, (name, found.error)
                assert sorted(found.partitions) == list(range(6)), name
        finally:
            reader.close()
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.integration
def test_the_dead_letter_and_forget_topics_get_their_retention_and_layout(kafka_settings):
    """kafka_settings created its topics: the dead-letter topic keeps rejected payloads for
    topics.dead_letter_retention_ms, the forget topic is one partition with its own.
    """
    topics = kafka_settings.topics
    admin = admin_client(kafka_settings.kafka)
    resources = [
        ConfigResource(ConfigResource.Type.TOPIC, name)
        for name in (topics.dead_letter, topics.forget)
    ]
    found = {
        resource.name: future.result()
        for resource, future in admin.describe_configs(resources).items()
    }
    retention = {name: int(configs["retention.ms"].value) for name, configs in found.items()}
    assert retention == {
        topics.dead_letter: topics.dead_letter_retention_ms,
        topics.forget: topics.forget_retention_ms,
    }
    metadata = admin.list_topics(timeout=10).topics
    assert len(metadata[topics.forget].partitions) == 1
    assert len(metadata[topics.dead_letter].partitions) == topics.partitions

"""ExactlyOnce's handling of each transactional error class, with small fakes."""

import pytest
from confluent_kafka import KafkaError, KafkaException

from pipeline.checkpoint import ExactlyOnce, Rewind
from pipeline.features import FeatureStore


def error(retriable=False, abortable=False, fatal=False):
    return KafkaException(
        KafkaError(
            KafkaError._STATE,
            "boom",
            fatal=fatal,
            retriable=retriable,
            txn_requires_abort=abortable,
        )
    )


class FakeProducer:
    def __init__(self, commit_errors=()):
        self.calls = []
        self.commit_errors = list(commit_errors)

    def init_transactions(self):
        self.calls.append("init")

    def begin_transaction(self):
        self.calls.append("begin")

    def send_offsets_to_transaction(self, offsets, metadata):
        self.calls.append("offsets")

    def commit_transaction(self):
        self.calls.append("commit")
        if self.commit_errors:
            raise self.commit_errors.pop(0)

    def abort_transaction(self):
        self.calls.append("abort")

    def flush(self, timeout):
        return 0


class FakeSink:
    def publish_state(self, changes):
        pass

    def raise_failures(self):
        pass


class FakeConsumer:
    def consumer_group_metadata(self):
        return "group-metadata"


class FakeMessage:
    def error(self):
        return None

    def topic(self):
        return "in"

    def partition(self):
        return 0

    def offset(self):
        return 41


def checkpoint_with(*producers):
    queue = list(producers)
    return ExactlyOnce(FakeConsumer(), lambda: queue.pop(0), lambda _: FakeSink(), FeatureStore(5))


def test_a_retriable_commit_is_retried_until_it_succeeds():
    producer = FakeProducer([error(retriable=True)])
    checkpoint = checkpoint_with(producer)
    checkpoint.begin_batch()
    checkpoint.end_batch([FakeMessage()])
    assert producer.calls == ["init", "begin", "offsets", "commit", "commit"]


def test_an_abortable_error_aborts_and_rewinds():
    producer = FakeProducer([error(abortable=True)])
    checkpoint = checkpoint_with(producer)
    checkpoint.begin_batch()
    with pytest.raises(Rewind):
        checkpoint.end_batch([FakeMessage()])
    assert producer.calls[-1] == "abort"
    checkpoint.begin_batch()  # the next batch opens a new transaction on the same producer
    assert producer.calls[-1] == "begin"


def test_a_fatal_error_replaces_the_producer_and_rewinds():
    first, second = FakeProducer([error(fatal=True)]), FakeProducer()
    checkpoint = checkpoint_with(first, second)
    checkpoint.begin_batch()
    with pytest.raises(Rewind):
        checkpoint.end_batch([FakeMessage()])
    assert "abort" not in first.calls
    assert second.calls == ["init"]  # the new producer fences the old transactional id
    checkpoint.begin_batch()
    assert second.calls == ["init", "begin"]

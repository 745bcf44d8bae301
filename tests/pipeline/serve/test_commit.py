"""The two delivery guarantees with small fakes: AtLeastOnce's ordering of outputs, state and
offsets; ExactlyOnce's handling of each transactional error class.
"""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from pipeline.kafka.clients import LINGER_MS
from pipeline.serve import commit
from pipeline.serve.commit import AtLeastOnce, CommitReports, ExactlyOnce, Rewind, next_offsets
from pipeline.serve.encode import Encoded
from pipeline.serve.produce import DeliveryError, Sink
from pipeline.serve.state import FeatureStore
from pipeline.serve.state.changes import StateChange
from pipeline.serve.state.table import CONTROL
from pipeline.settings import SettingsError, TopicSettings, load_settings
from tests.pipeline.columnar import columns_of
from tests.pipeline.sample import click_record


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
        self.offsets = []  # each call's offsets, {(topic, partition): offset}
        self.commit_errors = list(commit_errors)

    def init_transactions(self, timeout):
        self.calls.append("init")

    def begin_transaction(self):
        self.calls.append("begin")

    def send_offsets_to_transaction(self, offsets, metadata, timeout):
        self.calls.append("offsets")
        self.offsets.append({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def commit_transaction(self, timeout):
        self.calls.append("commit")
        if self.commit_errors:
            raise self.commit_errors.pop(0)

    def abort_transaction(self, timeout):
        self.calls.append("abort")

    def flush(self, timeout):
        return 0


class FakeSink:
    def __init__(self, producer):
        self.producer = producer

    def publish_state(self, changes):
        pass

    def close(self, timeout_s=10.0):
        self.producer.calls.append("close")

    def raise_failures(self):
        pass


class FakeConsumer:
    def consumer_group_metadata(self):
        return "group-metadata"


class FakeMessage:
    def __init__(self, partition=0, offset=41):
        self._partition = partition
        self._offset = offset

    def error(self):
        return None

    def topic(self):
        return "in"

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset


# --- at least once ------------------------------------------------------------------------


class QueueingProducer:
    """Holds every record until the test acknowledges it, like a broker that is slow."""

    def __init__(self):
        self.queued = []  # (topic, key, partition, callback)
        self.produced = []
        self.flushes = []  # each flush's timeout

    def produce(
        self,
        topic,
        value=None,
        key=None,
        partition=-1,
        callback=None,
        on_delivery=None,
        timestamp=0,
        headers=None,
    ):  # confluent-kafka's order of arguments: the sink passes some by position
        on_delivery = callback if callback is not None else on_delivery  # an alias
        self.queued.append((topic, key, partition, on_delivery))
        self.produced.append((topic, key))

    def ack(self, topic=None, error=None):
        """Acknowledge the queued records of `topic` (all if None), oldest first."""
        keep = []
        for record in self.queued:
            if topic is None or record[0] == topic:
                if record[3] is not None:  # a record that asked for a delivery report
                    record[3](error, AckedMessage(record[0]))
            else:
                keep.append(record)
        self.queued = keep

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=None):
        """A long wait sees everything acknowledged; a short one, nothing (it is slow)."""
        self.flushes.append(timeout)
        if timeout is not None and timeout < 1:
            return len(self.queued)
        self.ack()
        return 0

    def __len__(self):
        return len(self.queued)


class AckedMessage:
    def __init__(self, topic):
        self._topic = topic

    def topic(self):
        return self._topic


class CommittingConsumer:
    def __init__(self, errors=()):
        self.commits = []  # (offsets as {partition: offset}, asynchronous)
        self.errors = list(errors)  # what the next commits raise

    def commit(self, offsets, asynchronous):
        self.commits.append(({tp.partition: tp.offset for tp in offsets}, asynchronous))
        if self.errors:
            raise self.errors.pop(0)


TOPICS = TopicSettings(fraud_scores="scores")
CHANGELOG = "state"
PARTITIONS = {TOPICS.fraud_scores: 3, TOPICS.recommendations: 3, TOPICS.shadow_scores: 3}


def at_least_once(interval_ms=0, consumer=None, reports=None):
    """A checkpoint whose every batch closes a stretch (interval 0), and its state."""
    producer, store = QueueingProducer(), FeatureStore(5)
    consumer = consumer or CommittingConsumer()
    sink = Sink(producer, TOPICS, CHANGELOG, PARTITIONS)
    checkpoint = AtLeastOnce(
        consumer, sink, interval_ms, store.take_changes, reports or CommitReports()
    )
    return checkpoint, producer, consumer, store


def run_batch(checkpoint, store, partition, offset, user):
    """One batch of one event: the user's state changes, one output is produced; a closing
    batch takes the state's changes, as the pipeline's `_prepare` does.
    """
    store.get(partition, user, 1_000)
    changes = store.take_changes() if checkpoint.closing() else None
    columns = columns_of(click_record(user_id=user, event_id=f"e{offset}"))
    scored = SimpleNamespace(rows=np.array([0]), ranked=np.array([], dtype=np.int64), shadow=None)
    encoded = Encoded(b"e", [0, 1], b"", [0])  # outputs are opaque here
    checkpoint.begin_batch()
    checkpoint.sink.publish(columns, scored, encoded, [])
    checkpoint.end_batch(next_offsets([FakeMessage(partition, offset)]), changes)


def test_offsets_wait_for_outputs_then_state_without_blocking():
    checkpoint, producer, consumer, store = at_least_once()
    run_batch(checkpoint, store, partition=0, offset=7, user="u1")
    checkpoint.tick(idle=True)
    assert consumer.commits == []
    assert producer.produced == [("scores", b"u1")]  # no state before its outputs are safe

    producer.ack("scores")
    checkpoint.tick(idle=True)
    assert producer.produced[-1] == (CHANGELOG, b"u1")
    assert consumer.commits == []  # the state record is not acknowledged yet

    producer.ack(CHANGELOG)
    checkpoint.tick(idle=True)
    assert consumer.commits == [({0: 8}, True)]


def test_with_the_input_idle_what_is_queued_is_sent_at_once_not_after_the_linger():
    checkpoint, producer, consumer, store = at_least_once(interval_ms=60_000)
    checkpoint.tick(idle=True)
    assert producer.flushes == []  # nothing queued: nothing to wait for
    run_batch(checkpoint, store, partition=0, offset=7, user="u1")
    checkpoint.tick(idle=False)  # a batch in flight: its outputs and the next share requests
    assert producer.flushes == []
    checkpoint.tick(idle=True)
    assert producer.flushes == [commit.IDLE_SEND_S]  # librdkafka skips linger.ms in a flush
    # Never longer than the linger it saves, and whole milliseconds: below 1 ms the flush
    # ends before librdkafka sends (`Sink.send_now`).
    assert 0.001 <= commit.IDLE_SEND_S <= LINGER_MS / 1000
    assert consumer.commits == []  # a send that timed out commits nothing


def commit_one_batch(checkpoint, producer, store):
    """Run a batch (partition 0, offset 7) and tick until its stretch is committed."""
    run_batch(checkpoint, store, partition=0, offset=7, user="u1")
    checkpoint.tick(idle=True)
    producer.ack("scores")
    checkpoint.tick(idle=True)
    producer.ack(CHANGELOG)
    checkpoint.tick(idle=True)


def test_a_commit_refused_with_the_input_idle_is_made_good_at_the_next_interval():
    """The privacy test's failure: an asynchronous commit refused in a rebalance, then no
    input on the partitions kept; they stayed uncommitted until the next event.
    """
    reports = CommitReports()
    checkpoint, producer, consumer, store = at_least_once(reports=reports)
    commit_one_batch(checkpoint, producer, store)
    assert consumer.commits == [({0: 8}, True)]
    checkpoint.tick(idle=True)
    assert consumer.commits == [({0: 8}, True)]  # nothing new, nothing failed: no commit

    # librdkafka reports the result while the loop polls.
    refused = KafkaError(KafkaError.ILLEGAL_GENERATION, "generation id is not valid")
    reports(refused, [TopicPartition("in", 0, 8)])
    checkpoint.tick(idle=True)
    assert consumer.commits[1:] == [({0: 8}, True)]  # committed again, with nothing new
    checkpoint.tick(idle=True)
    assert len(consumer.commits) == 2  # once: that commit is not reported failed

    partition_error = SimpleNamespace(topic="in", partition=0, offset=8, error=refused)
    reports(None, [partition_error])  # a partition's own error (TopicPartition.error)
    checkpoint.commit()  # a revocation or the stop commits what failed, synchronously
    assert consumer.commits[2:] == [({0: 8}, False)]


def test_a_commit_that_raises_is_made_good_at_the_next_interval():
    consumer = CommittingConsumer(errors=[error(retriable=True)])
    checkpoint, producer, _, store = at_least_once(consumer=consumer)
    commit_one_batch(checkpoint, producer, store)
    checkpoint.tick(idle=True)
    checkpoint.tick(idle=True)
    assert consumer.commits == [({0: 8}, True)] * 2  # raised, then committed again once


def test_nothing_to_commit_is_not_a_failed_commit():
    reports = CommitReports()
    reports(KafkaError(KafkaError._NO_OFFSET), [])
    reports(None, [TopicPartition("in", 0, 8)])
    assert not reports.failed


def test_a_batch_writes_each_output_to_its_inputs_partition_and_one_report_asks_per_partition():
    producer, consumer = QueueingProducer(), CommittingConsumer()
    checkpoint = AtLeastOnce(
        consumer, Sink(producer, TOPICS, CHANGELOG, PARTITIONS), 0, list, CommitReports()
    )
    users = [f"u{i}" for i in range(5)]
    columns = columns_of(*(click_record(user_id=u, event_id=f"e{i}") for i, u in enumerate(users)))
    columns.partition[:] = [0, 1, 0, 4, 1]  # the output topics have 3 partitions
    scored = SimpleNamespace(rows=np.arange(5), ranked=np.array([3]), shadow=None)
    encoded = Encoded(b"abcde", [0, 1, 2, 3, 4, 5], b"r", [0, 1])
    checkpoint.begin_batch()
    checkpoint.sink.publish(columns, scored, encoded, [])
    scores = [(partition, report is not None) for topic, _, partition, report in producer.queued]
    # Partition 0's last record is the third, partition 1's the fifth (4 % 3 = 1).
    assert scores[:5] == [(0, False), (1, False), (0, True), (1, False), (1, True)]
    assert scores[5:] == [(1, True)]  # the recommendation of u3, alone in its partition
    checkpoint.end_batch({("in", 0): 5}, [])
    late = producer.queued.pop(2)  # partition 0's report comes last
    producer.ack()
    checkpoint.tick(idle=True)
    assert consumer.commits == []  # the records it vouches for are not known safe yet
    producer.queued.append(late)
    producer.ack()
    checkpoint.tick(idle=True)
    assert consumer.commits == [({0: 5}, True)]


def test_a_stretchs_changelog_records_ask_for_one_report_per_partition_its_last():
    producer = QueueingProducer()
    sink = Sink(producer, TOPICS, CHANGELOG, PARTITIONS)
    changes = [StateChange(p, f"u{i}".encode(), b"state") for i, p in enumerate([2, 0, 2, 1, 0])]
    unacked = sink.publish_state(changes)
    reports = [(partition, report is not None) for _, _, partition, report in producer.queued]
    assert reports == [(2, False), (0, False), (2, True), (1, True), (0, True)]
    assert unacked.count == 3
    late = producer.queued.pop(4)  # partition 0's last record
    producer.ack()
    assert unacked.count == 1  # the records it vouches for are not known safe yet
    producer.queued.append(late)
    producer.ack()
    assert unacked.count == 0


class FullQueueProducer(QueueingProducer):
    """A local queue of `room` records: produce raises BufferError when it is full, and
    serving with a wait (poll(timeout > 0)) acknowledges what it holds, running the delivery
    callbacks.
    """

    def __init__(self, room):
        super().__init__()
        self.room = room

    def produce(self, topic, value=None, key=None, partition=-1, callback=None, **named):
        if len(self.queued) >= self.room:
            raise BufferError("queue full")
        super().produce(topic, value, key, partition, callback, **named)

    def poll(self, timeout=0):
        if timeout > 0:
            self.ack()
        return 0


def test_a_full_local_queue_delays_outputs_and_state_without_losing_or_miscounting_them():
    producer, consumer = FullQueueProducer(room=2), CommittingConsumer()
    checkpoint = AtLeastOnce(
        consumer, Sink(producer, TOPICS, CHANGELOG, PARTITIONS), 0, list, CommitReports()
    )
    users = [f"u{i}" for i in range(5)]
    columns = columns_of(*(click_record(user_id=u, event_id=f"e{i}") for i, u in enumerate(users)))
    scored = SimpleNamespace(rows=np.arange(5), ranked=np.array([], dtype=np.int64), shadow=None)
    encoded = Encoded(b"abcde", [0, 1, 2, 3, 4, 5], b"", [0])
    checkpoint.begin_batch()
    checkpoint.sink.publish(columns, scored, encoded, [])
    states = [StateChange(0, u.encode(), b"state") for u in users]
    checkpoint.end_batch({("in", 0): 5}, states)  # closes the stretch
    assert [key for _, key in producer.produced] == [u.encode() for u in users]  # each once
    checkpoint.tick(idle=True)  # the last output is still queued, unacknowledged
    assert consumer.commits == []
    producer.ack()
    checkpoint.tick(idle=True)  # the state records, through the same full queue
    assert [key for topic, key in producer.produced if topic == CHANGELOG] == [
        u.encode() for u in users
    ]
    assert consumer.commits == []  # the last state record is still queued
    producer.ack()
    checkpoint.tick(idle=True)
    assert consumer.commits == [({0: 5}, True)]


def close_stretch(partitions, offset=5):
    """An at-least-once checkpoint whose one batch (outputs acknowledged) closed a stretch
    that changed a user on each of `partitions`.
    """
    producer, consumer = QueueingProducer(), CommittingConsumer()
    checkpoint = AtLeastOnce(
        consumer, Sink(producer, TOPICS, CHANGELOG, PARTITIONS), 0, list, CommitReports()
    )
    checkpoint.begin_batch()
    states = [StateChange(p, f"u{i}".encode(), b"state") for i, p in enumerate(partitions)]
    checkpoint.end_batch({("in", 0): offset}, states)
    return checkpoint, producer, consumer


def changelog_keys(producer):
    return [key for topic, key in producer.produced if topic == CHANGELOG]


def test_a_stretchs_changelog_records_go_out_a_chunk_a_tick_and_it_commits_after_the_last(
    monkeypatch,
):
    monkeypatch.setattr(commit, "STATE_CHUNK", 2)
    checkpoint, producer, consumer = close_stretch([0] * 5)
    checkpoint.tick(idle=True)
    assert changelog_keys(producer) == [b"u0", b"u1"]
    producer.ack()  # all that is queued is acknowledged, but not all is queued
    checkpoint.tick(idle=True)
    assert changelog_keys(producer) == [b"u0", b"u1", b"u2", b"u3"]
    assert consumer.commits == []
    producer.ack()
    checkpoint.tick(idle=True)
    assert changelog_keys(producer) == [b"u0", b"u1", b"u2", b"u3", b"u4"]
    assert consumer.commits == []  # the last chunk is queued, not acknowledged
    producer.ack()
    checkpoint.tick(idle=True)
    assert consumer.commits == [({0: 5}, True)]
    assert changelog_keys(producer) == [b"u0", b"u1", b"u2", b"u3", b"u4"]  # each once


def test_a_stretch_sealed_behind_an_unfinished_one_sends_the_rest_at_once(monkeypatch):
    monkeypatch.setattr(commit, "STATE_CHUNK", 2)
    checkpoint, producer, consumer = close_stretch([0] * 5)
    checkpoint.tick(idle=True)
    assert len(changelog_keys(producer)) == 2
    checkpoint.begin_batch()
    checkpoint.end_batch({("in", 0): 9}, [StateChange(0, b"v", b"state")])  # a second stretch
    checkpoint.tick(idle=True)
    assert changelog_keys(producer) == [b"u0", b"u1", b"u2", b"u3", b"u4"]
    producer.ack()
    checkpoint.tick(idle=True)
    checkpoint.tick(idle=True)  # the second stretch's record, then its acknowledgement
    producer.ack()
    checkpoint.tick(idle=True)
    assert [offsets for offsets, _ in consumer.commits] == [{0: 5}, {0: 9}]
    assert changelog_keys(producer)[-1] == b"v"


def test_a_lost_partitions_records_not_yet_queued_are_dropped_and_the_queued_kept(monkeypatch):
    monkeypatch.setattr(commit, "STATE_CHUNK", 2)
    checkpoint, producer, consumer = close_stretch([0, 1, 0, 1, 0])
    checkpoint.tick(idle=True)  # u0 (partition 0) and u1 (partition 1) are queued
    checkpoint.forget([TopicPartition("in", 1)])
    checkpoint.commit()
    assert changelog_keys(producer) == [b"u0", b"u1", b"u2", b"u4"]
    assert consumer.commits == [({0: 5}, False)]


def test_a_later_stretch_acknowledged_first_commits_nothing_before_the_earlier_one():
    checkpoint, producer, consumer, store = at_least_once()
    run_batch(checkpoint, store, partition=0, offset=7, user="u1")
    checkpoint.tick(idle=True)  # seals the first stretch
    first = list(producer.queued)
    producer.queued = []
    run_batch(checkpoint, store, partition=1, offset=3, user="u2")
    producer.ack("scores")  # only the second stretch's output
    checkpoint.tick(idle=True)
    assert consumer.commits == []
    assert (CHANGELOG, b"u2") not in producer.produced

    producer.queued = first
    producer.ack("scores")
    checkpoint.tick(idle=True)
    producer.ack(CHANGELOG)
    checkpoint.tick(idle=True)  # first stretch commits; the second's state goes out after it
    producer.ack(CHANGELOG)
    checkpoint.tick(idle=True)
    assert [offsets for offsets, _ in consumer.commits] == [{0: 8}, {0: 8, 1: 4}]
    states = [key for topic, key in producer.produced if topic == CHANGELOG]
    assert states == [b"u1", b"u2"]


def test_a_failed_output_stops_the_commit():
    checkpoint, producer, consumer, store = at_least_once()
    run_batch(checkpoint, store, partition=0, offset=7, user="u1")
    checkpoint.tick(idle=True)
    producer.ack("scores", error=KafkaError(KafkaError._MSG_TIMED_OUT))
    with pytest.raises(DeliveryError):
        checkpoint.tick(idle=True)
    assert consumer.commits == []
    assert (CHANGELOG, b"u1") not in producer.produced


def test_commit_waits_for_everything_and_commits_synchronously():
    checkpoint, producer, consumer, store = at_least_once()
    run_batch(checkpoint, store, partition=2, offset=10, user="u3")
    checkpoint.commit()
    assert consumer.commits == [({2: 11}, False)]
    assert producer.produced == [("scores", b"u3"), (CHANGELOG, b"u3")]


@pytest.mark.parametrize("interval_ms", [0, 10**9])  # sealed stretches, or one open one
def test_lost_partitions_are_neither_committed_nor_written_to_the_changelog(interval_ms):
    checkpoint, producer, consumer, store = at_least_once(interval_ms)
    run_batch(checkpoint, store, partition=0, offset=7, user="u1")
    run_batch(checkpoint, store, partition=1, offset=3, user="u2")
    checkpoint.forget([TopicPartition("in", 1)])
    store.drop_partition(1)  # as `Partitions` does next: its pending changes go with it
    checkpoint.commit()
    assert consumer.commits and all(offsets == {0: 8} for offsets, _ in consumer.commits)
    assert [key for topic, key in producer.produced if topic == CHANGELOG] == [b"u1"]


def test_revoked_partitions_are_committed_once_then_left_to_their_new_owner():
    checkpoint, _, consumer, store = at_least_once(interval_ms=10**9)
    run_batch(checkpoint, store, partition=0, offset=7, user="u1")
    run_batch(checkpoint, store, partition=1, offset=3, user="u2")
    checkpoint.commit([TopicPartition("in", 1)])
    run_batch(checkpoint, store, partition=0, offset=8, user="u1")
    checkpoint.commit()
    assert [offsets for offsets, _ in consumer.commits] == [{0: 8, 1: 4}, {0: 9}]


# --- exactly once -------------------------------------------------------------------------


def checkpoint_with(*producers):
    queue = list(producers)
    return ExactlyOnce(FakeConsumer(), lambda: queue.pop(0), FakeSink, list)


def test_a_retriable_commit_is_retried_until_it_succeeds():
    producer = FakeProducer([error(retriable=True)])
    checkpoint = checkpoint_with(producer)
    checkpoint.begin_batch()
    checkpoint.end_batch(next_offsets([FakeMessage()]), [])
    checkpoint.tick(idle=True)  # collects the commit
    assert producer.calls == ["init", "begin", "offsets", "commit", "commit"]


def test_an_abortable_error_aborts_and_rewinds():
    producer = FakeProducer([error(abortable=True)])
    checkpoint = checkpoint_with(producer)
    checkpoint.begin_batch()
    checkpoint.end_batch(next_offsets([FakeMessage()]), [])  # the commit starts
    with pytest.raises(Rewind):
        checkpoint.begin_batch()  # the next batch learns that it failed
    assert producer.calls[-1] == "abort"
    checkpoint.begin_batch()  # the next batch opens a new transaction on the same producer
    assert producer.calls[-1] == "begin"


def test_a_fatal_error_replaces_the_producer_and_rewinds():
    first, second = FakeProducer([error(fatal=True)]), FakeProducer()
    checkpoint = checkpoint_with(first, second)
    checkpoint.begin_batch()
    checkpoint.end_batch(next_offsets([FakeMessage()]), [])
    with pytest.raises(Rewind):
        checkpoint.tick(idle=True)  # between batches, as soon as the commit has failed
    assert "abort" not in first.calls
    assert first.calls[-1] == "close"  # released, not left running beside the new one
    assert second.calls == ["init"]  # the new producer fences the old transactional id
    checkpoint.begin_batch()
    assert second.calls == ["init", "begin"]
    checkpoint.close()
    assert second.calls[-1] == "close"


class BlockingProducer(FakeProducer):
    """Its commit waits until the test releases it, like a broker writing markers."""

    def __init__(self, commit_errors=()):
        super().__init__(commit_errors)
        self.release = threading.Event()
        self.started = threading.Event()

    def commit_transaction(self, timeout):
        self.started.set()
        assert self.release.wait(10)
        super().commit_transaction(timeout)


def blocked_commit(commit_errors=()):
    """A checkpoint whose first transaction is committing, and its producer."""
    producer = BlockingProducer(commit_errors)
    checkpoint = checkpoint_with(producer)
    checkpoint.begin_batch()
    checkpoint.end_batch(next_offsets([FakeMessage()]), [])
    assert producer.started.wait(10)
    return checkpoint, producer


def in_thread(call):
    """Start `call` on a thread; the thread and a list that gets its exception, if any."""
    raised = []

    def run():
        try:
            call()
        except Exception as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, raised


def test_a_commit_runs_beside_the_loop_and_the_next_batch_waits_for_it():
    checkpoint, producer = blocked_commit()
    assert checkpoint.committing()  # end_batch returned while the broker commits
    checkpoint.tick(idle=False)  # not done: the loop goes on
    thread, raised = in_thread(checkpoint.begin_batch)
    thread.join(0.2)
    assert thread.is_alive()  # the next batch's outputs wait for the commit
    assert producer.calls == ["init", "begin", "offsets"]
    producer.release.set()
    thread.join(10)
    assert not raised
    assert producer.calls == ["init", "begin", "offsets", "commit", "begin"]
    assert not checkpoint.committing()


@pytest.mark.parametrize("call", ["commit", "forget", "close"])
def test_a_commit_under_way_is_waited_for_before_a_commit_a_loss_or_the_close(call):
    checkpoint, producer = blocked_commit()
    thread, raised = in_thread(
        lambda: getattr(checkpoint, call)(
            *([[TopicPartition("in", 0)]] if call == "forget" else [])
        )
    )
    thread.join(0.2)
    assert thread.is_alive()
    producer.release.set()
    thread.join(10)
    assert not raised  # committed: nothing to abort or rewind
    assert producer.calls[:4] == ["init", "begin", "offsets", "commit"]
    assert "abort" not in producer.calls


def test_a_failed_commit_is_aborted_at_the_close():
    checkpoint, producer = blocked_commit([error(abortable=True)])
    producer.release.set()
    checkpoint.close()
    assert producer.calls[-2:] == ["abort", "close"]


def test_next_offsets_skip_errors_and_keep_each_partitions_highest():
    class Failed(FakeMessage):
        def error(self):
            return KafkaError(KafkaError._PARTITION_EOF)

    messages = [FakeMessage(0, 4), FakeMessage(1, 9), FakeMessage(0, 5), Failed(0, 50)]
    assert next_offsets(messages) == {("in", 0): 6, ("in", 1): 10}


def test_a_stretch_writes_each_user_it_changed_once_as_its_last_batch_left_them():
    checkpoint, producer, consumer, store = at_least_once(interval_ms=10**9)
    run_batch(checkpoint, store, partition=0, offset=7, user="u1")
    run_batch(checkpoint, store, partition=0, offset=8, user="u1")
    run_batch(checkpoint, store, partition=1, offset=3, user="u2")
    producer.ack()
    checkpoint.tick(idle=True)  # not due: the stretch stays open
    assert consumer.commits == []
    assert [topic for topic, _ in producer.produced] == ["scores"] * 3
    checkpoint.commit()  # a revoke or the stop closes it, taking the state's changes
    assert [key for topic, key in producer.produced if topic == CHANGELOG] == [b"u1", b"u2"]
    assert consumer.commits == [({0: 9, 1: 4}, False)]


def test_a_due_stretch_closes_between_batches_only_with_none_in_flight():
    checkpoint, producer, consumer, store = at_least_once()
    store.get(0, "u1", 1_000)  # a batch that did not close the stretch (changes: None)
    checkpoint.begin_batch()
    checkpoint.end_batch({("in", 0): 8}, None)
    checkpoint.tick(idle=False)  # a later batch is prepared: the state is past this one
    assert producer.produced == [] and consumer.commits == []
    checkpoint.tick(idle=True)
    assert producer.produced == [(CHANGELOG, b"u1")]
    producer.ack()
    checkpoint.tick(idle=True)
    assert consumer.commits == [({0: 8}, True)]


def test_a_control_record_goes_out_after_the_tombstones_of_its_stretch():
    """The forget position is written after the tombstones of the requests it covers."""
    producer = QueueingProducer()
    mark = CONTROL + b"forget-position"
    pending = [StateChange(0, b"u1", None), StateChange(0, mark, b"2")]
    checkpoint = AtLeastOnce(
        CommittingConsumer(),
        Sink(producer, TOPICS, CHANGELOG, PARTITIONS),
        10**9,
        lambda: pending,
        CommitReports(),
    )
    checkpoint.commit()
    assert [key for topic, key in producer.produced if topic == CHANGELOG] == [b"u1", mark]


def test_a_transaction_holds_the_batches_of_its_interval_then_commits_once():
    producer = FakeProducer()
    queue = [producer]
    checkpoint = ExactlyOnce(FakeConsumer(), lambda: queue.pop(0), FakeSink, list, 60_000)
    for offset in range(3):
        checkpoint.begin_batch()
        assert not checkpoint.closing()
        checkpoint.end_batch(next_offsets([FakeMessage(0, offset)]), None)
    checkpoint.tick(idle=True)  # not yet an interval old
    assert producer.calls == ["init", "begin"]
    checkpoint.commit()  # a revoke or the stop
    assert producer.calls == ["init", "begin", "offsets", "commit"]
    assert producer.offsets == [{("in", 0): 3}]  # the last batch's next offset covers all


def test_partitions_lost_with_a_transaction_open_abort_it_and_rewind():
    producer = FakeProducer()
    queue = [producer]
    checkpoint = ExactlyOnce(FakeConsumer(), lambda: queue.pop(0), FakeSink, list, 60_000)
    checkpoint.begin_batch()
    checkpoint.end_batch(next_offsets([FakeMessage(0, 1)]), None)
    with pytest.raises(Rewind):
        checkpoint.forget([TopicPartition("in", 0)])
    assert producer.calls[-1] == "abort"
    checkpoint.begin_batch()
    checkpoint.commit()
    assert producer.offsets == []  # the aborted batch's offsets never commit


def test_the_transaction_interval_must_fit_in_its_timeout():
    with pytest.raises(SettingsError, match="transaction_interval_ms"):
        load_settings(processing={"transaction_interval_ms": 6000, "transaction_timeout_ms": 10000})


# --- exactly once: no call without a bound, each failure handled once (issue #48) ---------


class AbortFails(FakeProducer):
    """Its abort raises, as librdkafka's did on a 3-broker cluster after `message(s) timed
    out` on a changelog partition (INVALID_TXN_STATE, fatal) or after an epoch bump (FENCED).
    """

    def abort_transaction(self, timeout):
        super().abort_transaction(timeout)
        raise error(fatal=True)


def test_an_abort_that_fails_replaces_the_producer_and_rewinds():
    first, second = AbortFails([error(abortable=True)]), FakeProducer()
    checkpoint = checkpoint_with(first, second)
    checkpoint.begin_batch()
    checkpoint.end_batch(next_offsets([FakeMessage()]), [])
    with pytest.raises(Rewind):  # not the abort's KafkaException
        checkpoint.tick(idle=True)
    assert first.calls[-2:] == ["abort", "close"]
    assert second.calls == ["init"]
    checkpoint.begin_batch()
    checkpoint.end_batch(next_offsets([FakeMessage(0, 42)]), [])
    checkpoint.commit()
    assert second.offsets == [{("in", 0): 43}]


def test_a_loss_whose_abort_fails_replaces_the_producer_and_rewinds():
    first, second = AbortFails(), FakeProducer()
    checkpoint = checkpoint_with(first, second)
    checkpoint.begin_batch()
    with pytest.raises(Rewind):
        checkpoint.forget([TopicPartition("in", 0)])
    assert second.calls == ["init"]


def test_after_the_close_a_revoke_neither_raises_from_a_closed_producer_nor_commits():
    # Issue #48: the loop stopped on an error, the checkpoint closed its producer, then the
    # consumer's close revoked the partitions and their commit called the closed producer
    # ("RuntimeError: Producer has been closed").
    producer = AbortFails()
    checkpoint = checkpoint_with(producer)
    checkpoint.begin_batch()
    checkpoint.end_batch(next_offsets([FakeMessage()]), None)
    checkpoint.close()  # its abort fails: the close goes on and releases the producer
    assert producer.calls[-2:] == ["abort", "close"]
    with pytest.raises(Rewind):
        checkpoint.commit([TopicPartition("in", 0)])
    with pytest.raises(Rewind):
        checkpoint.forget([TopicPartition("in", 0)])
    checkpoint.close()  # a second close is nothing
    assert producer.calls[-2:] == ["abort", "close"]


class RetriableForever(FakeProducer):
    """Every commit fails with a retriable error, as when the coordinator does not answer."""

    def commit_transaction(self, timeout):
        self.calls.append("commit")
        raise error(retriable=True)


def test_a_commit_retriable_until_the_bound_is_aborted_and_rewound(monkeypatch):
    monkeypatch.setattr(commit.time, "sleep", lambda _: None)
    producer = RetriableForever()
    queue = [producer]
    checkpoint = ExactlyOnce(FakeConsumer(), lambda: queue.pop(0), FakeSink, list, 0, 0.05)
    checkpoint.begin_batch()
    checkpoint.end_batch(next_offsets([FakeMessage()]), [])
    with pytest.raises(Rewind):
        checkpoint.tick(idle=True)
    assert producer.calls.count("commit") >= 1
    assert producer.calls[-1] == "abort"


class Hangs(FakeProducer):
    """Its commit does not return until released, whatever its timeout (librdkafka #5456)."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def commit_transaction(self, timeout):
        self.calls.append("commit")
        self.release.wait(30)


def test_a_commit_that_never_returns_is_abandoned_with_its_producer(monkeypatch):
    monkeypatch.setattr(commit, "ABANDON_GRACE_S", 0.1)
    stuck, second = Hangs(), FakeProducer()
    failures = []
    queue = [stuck, second]
    checkpoint = ExactlyOnce(
        FakeConsumer(), lambda: queue.pop(0), FakeSink, list, 0, 0.2, failures.append
    )
    checkpoint.begin_batch()
    checkpoint.end_batch(next_offsets([FakeMessage()]), [])
    with pytest.raises(Rewind):
        checkpoint.begin_batch()  # waits 0.3 s at most, not for ever
    assert failures == ["stalled"]
    assert second.calls == ["init"]  # fences the stuck one
    assert "close" not in stuck.calls  # not while its thread is inside it
    stuck.release.set()
    for _ in range(100):  # released once its call returns
        if "close" in stuck.calls:
            break
        threading.Event().wait(0.05)
    assert stuck.calls[-1] == "close"
    checkpoint.begin_batch()
    assert second.calls == ["init", "begin"]


class InitFails(FakeProducer):
    def init_transactions(self, timeout):
        self.calls.append("init")
        raise error(retriable=True)

    def close(self):
        self.calls.append("closed")


def test_a_producer_that_cannot_be_initialised_stops_exactly_once(monkeypatch):
    monkeypatch.setattr(commit.time, "sleep", lambda _: None)
    first, second = FakeProducer([error(fatal=True)]), InitFails()
    queue = [first, second]
    checkpoint = ExactlyOnce(FakeConsumer(), lambda: queue.pop(0), FakeSink, list, 0, 0.05)
    checkpoint.begin_batch()
    checkpoint.end_batch(next_offsets([FakeMessage()]), [])
    with pytest.raises(commit.TransactionsFailed, match="transaction_call_timeout_ms"):
        checkpoint.tick(idle=True)
    assert second.calls[-1] == "closed"
    with pytest.raises(Rewind):  # the revoke of the consumer's close: nothing is called
        checkpoint.commit()
    checkpoint.close()


class InitRefused(InitFails):
    """Refuses init_transactions `refusals` times (the predecessor's abort under way)."""

    def __init__(self, refusals):
        super().__init__()
        self.refusals = refusals

    def init_transactions(self, timeout):
        if self.refusals == 0:
            self.calls.append("init")
            return
        self.refusals -= 1
        super().init_transactions(timeout)


def test_a_starting_process_tries_its_first_init_again_while_it_is_refused(monkeypatch):
    # The chaos run: a restarted instance's init_transactions was refused
    # (CONCURRENT_TRANSACTIONS) for over 30 s while its predecessor's transaction was
    # aborted across a node fault, and it exited 3. At start it tries the bound again.
    monkeypatch.setattr(commit.time, "sleep", lambda _: None)
    refused = InitRefused(refusals=commit.STARTUP_TRIES - 1)
    checkpoint = ExactlyOnce(FakeConsumer(), lambda: refused, FakeSink, list, 0, 0.0)
    assert refused.calls.count("init") == commit.STARTUP_TRIES
    checkpoint.begin_batch()
    checkpoint.close()
    never = InitRefused(refusals=10**6)
    with pytest.raises(commit.TransactionsFailed, match="transaction_call_timeout_ms"):
        ExactlyOnce(FakeConsumer(), lambda: never, FakeSink, list, 0, 0.0)
    assert never.calls.count("init") == commit.STARTUP_TRIES and never.calls[-1] == "closed"


def test_progress_stalls_only_while_processed_input_waits_for_a_commit(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(commit.time, "monotonic", lambda: now[0])
    progress = commit.Progress()
    now[0] += 500
    assert progress.stalled_s() == 0  # nothing waits: an idle input is not a stall
    progress.waiting()
    now[0] += 30
    progress.waiting()  # more input: the clock keeps running from the first
    now[0] += 30
    assert progress.stalled_s() == 60
    progress.committed(waiting=True)
    now[0] += 5
    assert progress.stalled_s() == 5
    progress.committed(waiting=False)
    assert progress.stalled_s() == 0


def test_each_checkpoint_reports_progress_at_its_commits():
    producer = FakeProducer()
    checkpoint = checkpoint_with(producer)
    checkpoint.begin_batch()
    assert checkpoint.progress._waiting
    checkpoint.end_batch(next_offsets([FakeMessage()]), [])
    checkpoint.tick(idle=True)
    assert not checkpoint.progress._waiting
    alo, _, _, store = at_least_once(interval_ms=10**9)
    run_batch(alo, store, partition=0, offset=7, user="u1")
    assert alo.progress._waiting
    alo.commit()
    assert not alo.progress._waiting


def test_a_close_during_a_commit_that_never_returns_leaves_its_producer_alone(monkeypatch):
    monkeypatch.setattr(commit, "ABANDON_GRACE_S", 0.1)
    stuck = Hangs()
    checkpoint = ExactlyOnce(FakeConsumer(), lambda: stuck, FakeSink, list, 0, 0.2)
    checkpoint.begin_batch()
    checkpoint.end_batch(next_offsets([FakeMessage()]), [])
    started = time.monotonic()
    checkpoint.close()  # the stop: bounded, not waiting for ever
    assert time.monotonic() - started < 5
    assert "close" not in stuck.calls and "abort" not in stuck.calls
    # The stuck thread is a daemon: it cannot keep the process from exiting.
    committing = [t for t in threading.enumerate() if t.name.startswith("commit")]
    assert committing and all(t.daemon for t in committing)
    stuck.release.set()

"""Backpressure and the registry hold against a small fake consumer (the real consumer is
covered end to end).
"""

import pytest

from pipeline.serve.consume import Backpressure, RegistryHold, take_batch


class FakeConsumer:
    def __init__(self):
        self.calls = []

    def assignment(self):
        return ["p0", "p1"]

    def pause(self, partitions):
        self.calls.append(("pause", partitions))

    def resume(self, partitions):
        self.calls.append(("resume", partitions))


class QueueConsumer:
    """A local queue of fetched messages; `arriving` land when a wait begins (poll)."""

    def __init__(self, fetched=(), arriving=()):
        self.queue = list(fetched)
        self.arriving = list(arriving)
        self.calls = []

    def consume(self, num_messages, timeout):
        self.calls.append(("consume", num_messages, timeout))
        taken, self.queue = self.queue[:num_messages], self.queue[num_messages:]
        return taken

    def poll(self, timeout):
        self.calls.append(("poll", timeout))
        self.queue += self.arriving
        self.arriving = []
        return self.queue.pop(0) if self.queue else None


def test_a_batch_takes_what_is_fetched_without_waiting_to_fill():
    consumer = QueueConsumer(fetched=["m0", "m1", "m2"])
    assert take_batch(consumer, 2, 0.005) == ["m0", "m1"]
    assert take_batch(consumer, 2, 0.005) == ["m2"]
    assert consumer.calls == [("consume", 2, 0), ("consume", 2, 0)]  # no wait


@pytest.mark.parametrize("max_batch", [1, 2, 500])
def test_with_nothing_fetched_a_batch_waits_only_for_its_first_message(max_batch):
    consumer = QueueConsumer(arriving=["m0", "m1", "m2"])
    batch = take_batch(consumer, max_batch, 0.005)
    assert batch == ["m0", "m1", "m2"][:max_batch]
    assert consumer.calls[:2] == [("consume", max_batch, 0), ("poll", 0.005)]
    assert all(timeout == 0 for *_, timeout in consumer.calls[2:])
    assert take_batch(QueueConsumer(), max_batch, 0.005) == []  # nothing within the wait


def test_a_batch_behind_one_in_flight_never_waits():
    consumer = QueueConsumer(arriving=["m0"])
    assert take_batch(consumer, 500, 0) == []
    assert consumer.calls == [("consume", 500, 0)]


def test_pauses_above_the_limit_and_resumes_at_half():
    consumer = FakeConsumer()
    backpressure = Backpressure(max_in_flight=100)
    steps = [(50, False), (101, True), (150, False), (51, False), (50, False), (40, False)]
    for in_flight, just_paused in steps:
        assert backpressure.update(consumer, in_flight) is just_paused
    assert consumer.calls == [("pause", ["p0", "p1"]), ("resume", ["p0", "p1"])]
    assert not backpressure.paused


def test_a_hold_pauses_whatever_is_in_flight_and_backpressure_never_lifts_it():
    consumer = FakeConsumer()
    gate = Backpressure(max_in_flight=100)
    gate.hold(consumer, "schema_registry")
    assert gate.paused and consumer.calls == [("pause", ["p0", "p1"])]
    gate.update(consumer, 101)
    gate.update(consumer, 0)  # below half: backpressure alone would resume here
    assert gate.paused and len(consumer.calls) == 1
    gate.release(consumer)
    assert not gate.paused and consumer.calls[-1] == ("resume", ["p0", "p1"])


def test_registry_retries_back_off_doubling_to_the_cap_and_reset_after_a_batch():
    hold = RegistryHold(backoff_s=0.5, max_s=2.0)
    assert [hold.failed() for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]
    assert not hold.due()
    hold.succeeded()
    assert hold.failed() == 0.5


class RecordingStore:
    def __init__(self, calls):
        self.calls = calls

    def drop_partition(self, partition):
        self.calls.append(("drop", partition))


def leaving(settle_reason, seal_error, clean=False):
    from confluent_kafka import TopicPartition

    from pipeline.serve.commit import Rewind
    from pipeline.serve.consume import Partitions
    from pipeline.serve.counts import RunStats
    from pipeline.settings import Settings

    calls = []
    partitions = Partitions(Settings(), RecordingStore(calls), None, RunStats())
    partitions.save = lambda numbers: calls.append(("save", numbers))

    def settle():
        calls.append("settle")
        return settle_reason

    def seal(tps):
        calls.append(("seal", [tp.partition for tp in tps]))
        if seal_error:
            raise Rewind(seal_error)

    partitions._leave([TopicPartition("in", 1), TopicPartition("in", 2)], settle, seal, clean)
    return calls, partitions.rewind_due


def test_a_leaving_partition_is_settled_then_sealed_then_dropped():
    calls, due = leaving(None, None)
    assert calls == ["settle", ("seal", [1, 2]), ("drop", 1), ("drop", 2)]
    assert due is None


def test_a_rollback_met_while_leaving_is_left_for_the_loop_and_the_state_still_dropped():
    calls, due = leaving("aborted in settle", None)
    assert due == "aborted in settle" and calls[-2:] == [("drop", 1), ("drop", 2)]
    calls, due = leaving(None, "aborted in commit")
    assert due == "aborted in commit" and calls[-2:] == [("drop", 1), ("drop", 2)]


def test_a_partition_revoked_with_everything_committed_leaves_a_snapshot_before_its_drop():
    calls, _ = leaving(None, None, clean=True)
    assert calls == ["settle", ("seal", [1, 2]), ("save", [1, 2]), ("drop", 1), ("drop", 2)]
    # Rolled back, or lost rather than revoked: its state is not what was committed.
    for settle_reason, seal_error in (("aborted in settle", None), (None, "aborted in commit")):
        calls, _ = leaving(settle_reason, seal_error, clean=True)
        assert not [call for call in calls if call[0] == "save"], calls
    calls, _ = leaving(None, None, clean=False)
    assert not [call for call in calls if call[0] == "save"], calls


def test_a_restore_counts_the_states_from_snapshots_and_from_the_changelog(monkeypatch):
    from pipeline.serve import consume
    from pipeline.serve.consume import Partitions
    from pipeline.serve.counts import RunStats
    from pipeline.serve.state.changelog import RestoreStats
    from pipeline.serve.state.table import UserTable
    from pipeline.settings import Settings
    from pipeline.telemetry import Telemetry

    stats = RestoreStats((0, 1), records=10, seconds=0.5, controls={}, from_snapshot=7)
    monkeypatch.setattr(consume, "restore", lambda *args, **kwargs: stats)
    telemetry, counts = Telemetry(), RunStats()
    Partitions(Settings(), UserTable(5), telemetry, counts).restore([0, 1])
    sample = telemetry.registry.get_sample_value
    assert sample("streamscore_restored_records_total", {"source": "snapshot"}) == 7
    assert sample("streamscore_restored_records_total", {"source": "changelog"}) == 3
    assert counts.restored == 10


class RewindingConsumer:
    """Its committed offsets fail `failures` times (a group coordinator restarting)."""

    def __init__(self, failures):
        self.failures = failures
        self.seeks = []

    def assignment(self):
        from confluent_kafka import TopicPartition

        return [TopicPartition("in", 0), TopicPartition("in", 1)]

    def committed(self, partitions, timeout):
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        assert timeout <= 5  # a short try, repeated, rather than one long wait
        if self.failures:
            self.failures -= 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "coordinator restarting"))
        return [TopicPartition("in", 0, 7), TopicPartition("in", 1, -1001)]

    def seek(self, tp):
        self.seeks.append((tp.partition, tp.offset))


def test_a_rewind_whose_offsets_do_not_answer_retries_without_restoring_first(monkeypatch):
    from pipeline.serve import consume
    from pipeline.serve.consume import Partitions
    from pipeline.serve.counts import RunStats
    from pipeline.settings import Settings

    monkeypatch.setattr(consume.time, "sleep", lambda _: None)
    calls = []
    partitions = Partitions(Settings(), RecordingStore(calls), None, RunStats())
    partitions.restore = lambda numbers: calls.append(("restore", numbers))
    consumer = RewindingConsumer(failures=1)
    partitions.rewind(consumer, "aborted")
    assert partitions.rewind_due == "aborted"  # the loop tries again
    assert ("restore", [0, 1]) not in calls and consumer.seeks == []
    partitions.rewind(consumer, "aborted")
    assert partitions.rewind_due is None
    assert calls.count(("restore", [0, 1])) == 1
    assert consumer.seeks == [(0, 7), (1, consume.OFFSET_BEGINNING)]

"""Backpressure and the registry hold against a small fake consumer (the real consumer is
covered end to end).
"""

from pipeline.serve.consume import Backpressure, RegistryHold


class FakeConsumer:
    def __init__(self):
        self.calls = []

    def assignment(self):
        return ["p0", "p1"]

    def pause(self, partitions):
        self.calls.append(("pause", partitions))

    def resume(self, partitions):
        self.calls.append(("resume", partitions))


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
    from pipeline.serve.features.changelog import RestoreStats
    from pipeline.serve.features.table import UserTable
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

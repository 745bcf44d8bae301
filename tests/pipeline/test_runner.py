"""Backpressure against a small fake consumer (the real one is covered end to end)."""

from pipeline.runner import Backpressure


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

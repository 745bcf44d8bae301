"""The ceiling baseline commits only offsets whose outputs are flushed, and only when any."""

from pipeline.tools.bench.baselines import flushed_offsets


class Producer:
    def __init__(self, log):
        self.log = log

    def flush(self, *args):
        self.log.append("flush")
        return 0


def test_offsets_are_handed_over_after_the_flush_and_then_forgotten():
    log = []
    mirrored = {("in", 0): 11, ("in", 2): 4}
    offsets = flushed_offsets(Producer(log), mirrored)
    assert log == ["flush"]
    assert sorted((tp.topic, tp.partition, tp.offset) for tp in offsets) == [
        ("in", 0, 11),
        ("in", 2, 4),
    ]
    assert mirrored == {}


def test_nothing_mirrored_gives_nothing_to_commit():
    # A synchronous commit of nothing raised _NO_OFFSET and crashed the ceiling at its stop.
    log = []
    assert flushed_offsets(Producer(log), {}) == []
    assert log == ["flush"]

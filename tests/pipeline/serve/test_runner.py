"""The batches in flight between prepare and finish, with fake engines and a recording
checkpoint (the real clients are covered end to end).
"""

import secrets
import time

import numpy as np
import pytest
from confluent_kafka import Message
from pydantic import SecretStr

import schemas
from pipeline.serve.commit import Rewind
from pipeline.serve.inflight import COMMIT_AHEAD
from pipeline.serve.records import EVENT_ID
from pipeline.serve.runner import Pipeline, _next_offsets
from pipeline.serve.score import REASON_NAMES
from pipeline.serve.state.reference import OFFSET, SESSION_EVENTS, UserState
from pipeline.settings import PrivacySettings, ProcessingSettings, Settings
from schemas.catalog import StaticCatalog
from schemas.codec import Encoder
from tests.pipeline.columnar import columns_of
from tests.pipeline.sample import click_record
from tests.pipeline.serve.test_score import FakeFraud, FakeRanking

# --- batches in flight ----------------------------------------------------------------------


class ConstantFraud(FakeFraud):
    """Scores every row 0.5, however many calls."""

    def infer(self, inputs):
        rows = len(inputs["numeric"])
        return {
            "score": np.full(rows, 0.5, dtype=np.float32),
            "contributions": np.zeros((rows, len(REASON_NAMES)), dtype=np.float32),
        }


def ConsumedMessage(record, offset, partition=0):
    """What the consumer hands over for one ClickEvent record (confluent-kafka's own
    constructor).
    """
    return Message(
        topic="clicks",
        partition=partition,
        offset=offset,
        key=record["user_id"].encode(),
        value=Encoder(schemas.CLICK_EVENT).encode(record),
        timestamp=(1, record["event_time"]),
    )


class RecordingSink:
    def __init__(self):
        self.published = []

    def publish(self, columns, scored, encoded, dead, headers):
        self.published.append([columns.text(row, EVENT_ID) for row in scored.rows.tolist()])


class RecordingCheckpoint:
    """Records what each finished batch hands over; optionally rolls the first one back.
    `closing`: whether each batch prepared in turn closes a stretch (default: every one).
    """

    def __init__(self, rewind_first=False, closing=()):
        self.sink = RecordingSink()
        self.ended = []
        self._rewind = rewind_first
        self._closing = list(closing)
        self.commit_under_way = False

    def closing(self):
        return self._closing.pop(0) if self._closing else True

    def committing(self):
        return self.commit_under_way

    def begin_batch(self):
        pass

    def end_batch(self, offsets, changes):
        if self._rewind:
            self._rewind = False
            raise Rewind("aborted")
        states = None
        if changes is not None:
            states = {c.key.decode(): UserState.from_bytes(c.value) for c in changes}
        self.ended.append((offsets, states))


def pipeline(depth):
    settings = Settings(
        processing=ProcessingSettings(inference_depth=depth),
        privacy=PrivacySettings(pseudonym_key=SecretStr(secrets.token_urlsafe(32))),
    )
    return Pipeline(settings, ConstantFraud([]), FakeRanking(), StaticCatalog())


def event_message(offset, user="u1"):
    now = int(time.time() * 1000)
    record = click_record(event_id=f"e{offset}", user_id=user, event_time=now + offset)
    return ConsumedMessage(record, offset)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_batches_in_flight_finish_in_order_each_with_the_state_it_left(depth):
    runner = pipeline(depth)
    checkpoint = RecordingCheckpoint()
    try:
        # Both are prepared before either finishes: the second's features already moved
        # the user on, yet the first hands over the state as it left it.
        runner.batches.add([event_message(0)], checkpoint)
        second = [event_message(1), event_message(2, "u2")]
        runner.batches.add(second, checkpoint)
        runner.batches.drain(checkpoint)
    finally:
        runner.close()
    assert checkpoint.sink.published == [["e0"], ["e1", "e2"]]
    (first_offsets, first), (second_offsets, second) = checkpoint.ended
    # One partition: the next offsets after each batch.
    assert (first_offsets, second_offsets) == ({("clickstream", 0): 1}, {("clickstream", 0): 3})
    assert first["u1"].ints[OFFSET] == 0 and first["u1"].ints[SESSION_EVENTS] == 1
    assert set(first) == {"u1"}
    assert second["u1"].ints[OFFSET] == 1 and second["u1"].ints[SESSION_EVENTS] == 2
    assert second["u2"].ints[OFFSET] == 2
    assert runner.stats.scored == 3 and runner.stats.batches == 2
    # Each stage of the loop is timed on both clocks: the thread's CPU within the wall time,
    # under the stats file's names.
    stats = runner.stats.report()
    for stage in ("decode", "features", "score", "encode", "produce"):
        assert 0 < stats[f"{stage}_cpu_s"] <= stats[f"{stage}_s"] * 1.01 + 1e-5, stage


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_only_a_closing_batch_carries_changes_of_every_user_its_stretch_changed(depth):
    runner = pipeline(depth)
    checkpoint = RecordingCheckpoint(closing=[False, False, True, False])
    try:
        for batch in ([event_message(0)], [event_message(1, "u2")], [event_message(2)]):
            runner.batches.add(batch, checkpoint)
        runner.batches.add([event_message(3, "u3")], checkpoint)
        runner.batches.drain(checkpoint)
    finally:
        runner.close()
    first, second, closing, after = (states for _, states in checkpoint.ended)
    assert first is None and second is None and after is None  # theirs stay in the state
    assert set(closing) == {"u1", "u2"}  # each once, as the closing batch left them
    assert closing["u1"].ints[OFFSET] == 2 and closing["u1"].ints[SESSION_EVENTS] == 2
    assert closing["u2"].ints[OFFSET] == 1
    assert [change.key for change in runner.store.take_changes()] == [b"u3"]  # still pending


def test_a_rollback_in_a_rebalance_drops_the_batches_in_flight_and_is_left_to_the_loop():
    runner = pipeline(depth=2)
    checkpoint = RecordingCheckpoint(rewind_first=True)
    try:
        runner.batches.add([event_message(0)], checkpoint)
        runner.batches.add([event_message(1)], checkpoint)
        reason = runner.batches.settle(checkpoint)  # what on_revoke and on_lost do first
    finally:
        runner.close()
    assert not runner.batches
    assert checkpoint.ended == []  # the second batch is not finished after the rollback
    assert checkpoint.sink.published == [["e0"]]
    assert reason == "aborted"


def test_inference_runs_on_its_own_thread_by_default_whatever_the_engines_run_on():
    runner = Pipeline(
        Settings(privacy=PrivacySettings(pseudonym_key=SecretStr(secrets.token_urlsafe(32)))),
        ConstantFraud([]),
        FakeRanking(),  # on CPU
        StaticCatalog(),
    )
    try:
        assert runner.inference.depth == 1
        assert not runner.inference.inline
    finally:
        runner.close()
    inline = pipeline(0)
    try:
        assert inline.inference.inline
    finally:
        inline.close()


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_a_batch_whose_inference_is_done_goes_out_before_the_next_is_prepared(depth):
    runner = pipeline(depth)
    checkpoint = RecordingCheckpoint()
    try:
        runner.batches.admit([event_message(0)], checkpoint)
        next(iter(runner.batches)).inference.result()  # done
        runner.batches.admit([event_message(1)], checkpoint)
        assert checkpoint.sink.published == [["e0"]]
        assert [batch.messages[0].offset() for batch in runner.batches] == [1]
        # While a transaction commits, the done batch stays: its outputs would wait for it.
        next(iter(runner.batches)).inference.result()
        checkpoint.commit_under_way = True
        runner.batches.admit([event_message(2)], checkpoint)
        assert checkpoint.sink.published == [["e0"]]
        assert [batch.messages[0].offset() for batch in runner.batches] == [1, 2]
        runner.batches.drain(checkpoint)
    finally:
        runner.close()
    assert checkpoint.sink.published == [["e0"], ["e1"], ["e2"]]


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_while_a_transaction_commits_the_loop_prepares_further_batches(depth):
    runner = pipeline(depth)
    checkpoint = RecordingCheckpoint()
    try:
        assert runner.batches.ahead(checkpoint) == depth
        checkpoint.commit_under_way = True  # the next batch's outputs would wait for it
        assert runner.batches.ahead(checkpoint) == depth + COMMIT_AHEAD
    finally:
        runner.close()


def test_next_offsets_are_each_partitions_highest_plus_one():
    records = [click_record(event_id=f"e{i}") for i in range(5)]
    columns = columns_of(*records)
    columns.partition[:] = [2, 0, 2, 0, 1]
    columns.offset[:] = [10, 4, 11, 5, 7]
    assert _next_offsets("t", columns) == {("t", 0): 6, ("t", 1): 8, ("t", 2): 12}
    assert _next_offsets("t", columns_of()) == {}

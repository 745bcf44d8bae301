"""Scorer with small fake engines: record shape, decisions, reasons, candidate chunking, and
the inference thread."""

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.base import EngineError
from engines.vocabulary import PAD, map_item_ids
from pipeline.serve.score import (
    REASON_NAMES,
    InferenceThread,
    Scorer,
    _ranking_inputs,
    _top_items,
    infer,
    top_reasons,
)
from pipeline.serve.spec import FRAUD_NUMERIC, feature_hash
from pipeline.settings import DecisionSettings, RankingSettings
from tests.pipeline.columnar import featurised, fraud_records, recommendation_records
from tests.pipeline.sample import click_record


class FakeFraud:
    name, version, backend, max_batch_size = "fraud", "3", "fake", 2
    on_gpu = False

    def __init__(self, scores, manifest_hash=None):
        self.scores = np.asarray(scores, dtype=np.float32)
        self.manifest = {"feature_hash": manifest_hash or feature_hash()}
        self.calls = 0

    def infer(self, inputs):
        rows = len(inputs["numeric"])
        start = self.calls * self.max_batch_size
        self.calls += 1
        contributions = np.zeros((rows, len(REASON_NAMES)), dtype=np.float32)
        contributions[:, FRAUD_NUMERIC.index("new_card")] = 2.0
        contributions[:, 0] = -1.0
        return {"score": self.scores[start : start + rows], "contributions": contributions}

    def close(self):
        pass


class FakeRanking:
    """Scores each candidate by its raw id's embedding row: a higher id ranks first."""

    name, version, backend, max_batch_size = "ranking", "7", "fake", 4
    on_gpu = False

    def __init__(self):
        self.manifest = {"item_vocabulary": 1000, "category_vocabulary": 10, "candidates": 3}

    def infer(self, inputs):
        return {"scores": inputs["candidate_items"].astype(np.float32)}

    def close(self):
        pass


def scorer(fraud):
    return Scorer(fraud, FakeRanking(), DecisionSettings(), RankingSettings(top_k=4))


def score(current, columns, rows, features):
    scored = current.score(columns, rows, features)
    return fraud_records(columns, scored), recommendation_records(columns, scored)


def test_every_candidate_is_scored_even_an_id_that_looks_like_padding():
    batch = featurised(click_record(event_id="a", candidates=[-1, 3]))
    scorer_all = Scorer(
        FakeFraud([0.1]), FakeRanking(), DecisionSettings(), RankingSettings(top_k=10)
    )
    _, (rec,) = score(scorer_all, *batch)
    assert sorted(item["item_id"] for item in rec["items"]) == [-1, 3]


def test_decisions_reasons_and_model_versions():
    batch = featurised(
        click_record(event_id="a"), click_record(event_id="b"), click_record(event_id="c")
    )
    fraud, recommendations = score(scorer(FakeFraud([0.1, 0.6, 0.95])), *batch)
    assert [r["decision"] for r in fraud] == ["allow", "review", "block"]
    first = fraud[0]
    assert first["reasons"] == [{"feature": "new_card", "contribution": 2.0}]  # only positive ones
    assert (first["model_name"], first["model_version"]) == ("fraud", "3")
    assert [r["event_id"] for r in fraud] == ["a", "b", "c"]
    assert recommendations == []


def test_candidates_beyond_the_model_slots_are_chunked_and_ranked_together():
    batch = featurised(
        click_record(event_id="a", candidates=[5, 900, 7, 10**9, 42, -1]),
        click_record(event_id="b"),
        click_record(event_id="c", candidates=[3, 3, 8]),
    )
    _, (rec, other) = score(scorer(FakeFraud([0.1, 0.1, 0.1])), *batch)
    ranked = [item["item_id"] for item in rec["items"]]
    # Known ids map to row id+2, unknown ones to row 1: 900 > 42 > 7 > 5 > unknown; top 4 kept.
    assert ranked == [900, 42, 7, 5]
    assert len(rec["items"]) == 4  # top_k of the six, -1 included as a candidate, not padding
    assert rec["event_id"] == "a" and rec["model_version"] == "7"
    # Equal scores keep the list's order; a list shorter than top_k keeps all its items.
    assert other["event_id"] == "c"
    assert [item["item_id"] for item in other["items"]] == [8, 3, 3]


def test_a_model_trained_on_other_features_is_refused():
    with pytest.raises(EngineError, match="retrain or pin"):
        scorer(FakeFraud([0.5], manifest_hash="0000"))


def test_swap_serves_the_new_version_from_the_next_batch_and_keeps_the_old_on_refusal():
    batch = featurised(click_record(event_id="a"))
    current = scorer(FakeFraud([0.1, 0.1]))
    newer = FakeFraud([0.2] * 4)
    newer.version = "4"
    old = current.swap("fraud", newer)
    assert old.version == "3"
    assert score(current, *batch)[0][0]["model_version"] == "4"

    with pytest.raises(EngineError, match="retrain or pin"):
        current.swap("fraud", FakeFraud([0.3], manifest_hash="other"))
    with pytest.raises(EngineError, match="lacks a ranking manifest field"):
        current.swap("ranking", FakeFraud([0.3]))
    assert score(current, *batch)[0][0]["model_version"] == "4"


def test_a_batch_prepared_before_a_swap_is_scored_and_labelled_by_the_engine_it_was_prepared_for():
    columns, rows, features = featurised(click_record(event_id="a"))
    current = scorer(FakeFraud([0.1]))
    request = current.prepare(columns, rows, features)
    newer = FakeFraud([0.99])
    newer.version = "4"
    current.swap("fraud", newer)
    scored = current.shape(columns, rows, request, infer(request))
    (record,) = fraud_records(columns, scored)
    assert (record["model_version"], record["decision"]) == ("3", "allow")
    assert newer.calls == 0


class SlowFraud(FakeFraud):
    """Sleeps in inference (as an engine releasing the GIL would) and remembers its thread."""

    def __init__(self, scores, fail_on=None):
        super().__init__(scores)
        self.threads = set()
        self.fail_on = fail_on

    def infer(self, inputs):
        self.threads.add(threading.current_thread().name)
        time.sleep(0.01)
        if self.fail_on is not None and self.calls == self.fail_on:
            raise EngineError("device lost")
        return super().infer(inputs)


@pytest.mark.parametrize("depth", [0, 1])
def test_the_inference_thread_scores_in_submission_order_and_hands_back_engine_errors(depth):
    fraud = SlowFraud([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], fail_on=3)
    current = scorer(fraud)
    thread = InferenceThread(depth)
    batches = [featurised(click_record(event_id=str(i))) for i in range(4)]
    try:
        futures = [thread.submit(current.prepare(*batch)) for batch in batches]
        # Two rows per engine call and one per batch: calls 0, 1 and 2 score rows 0, 2 and 4.
        scores = [float(f.result().probability[0]) for f in futures[:3]]
        assert scores == pytest.approx([0.1, 0.3, 0.5])
        with pytest.raises(EngineError, match="device lost"):
            futures[3].result()
    finally:
        thread.close()
    assert fraud.threads == ({"MainThread"} if depth == 0 else {"inference_0"})


def test_a_batch_with_no_row_to_score_shapes_and_encodes_nothing():
    """A batch whose rows are all replays reaches scoring with none: no crash, no output."""
    columns, rows, features = featurised(click_record(event_id="a"))
    none = rows[:0]
    fraud, recommendations = score(scorer(FakeFraud([0.5])), columns, none, features)
    assert fraud == [] and recommendations == []


class BrokenFraud(FakeFraud):
    def infer(self, inputs):
        raise EngineError("challenger broke")


def test_a_shadow_challenger_scores_the_same_rows_and_never_decides():
    batch = featurised(
        click_record(event_id="a"), click_record(event_id="b"), click_record(event_id="c")
    )
    current = scorer(FakeFraud([0.1, 0.6, 0.95]))
    challenger = FakeFraud([0.99, 0.05, 0.5])
    challenger.version = "9"
    assert current.swap_shadow(challenger) is None
    scored = current.score(*batch)
    assert [float(s) for s in scored.score] == pytest.approx([0.1, 0.6, 0.95])
    assert scored.decision.tolist() == [0, 1, 2]  # the champion's, untouched
    shadow = scored.shadow
    assert shadow is not None and shadow.fraud_model == ("fraud", "9")
    assert [float(s) for s in shadow.score] == pytest.approx([0.99, 0.05, 0.5])
    assert shadow.decision.tolist() == [2, 0, 1]  # what it would have decided, recorded only
    assert shadow.reason_count.tolist() == scored.reason_count.tolist()
    assert current.swap_shadow(None) is challenger
    assert current.score(*batch).shadow is None
    with pytest.raises(EngineError, match="retrain or pin"):
        current.swap_shadow(FakeFraud([0.3], manifest_hash="other"))
    assert current.shadow is None


def test_a_failing_shadow_costs_nothing_but_its_own_scores():
    batch = featurised(click_record(event_id="a"), click_record(event_id="b"))
    current = scorer(FakeFraud([0.1, 0.95]))
    current.swap_shadow(BrokenFraud([0.5, 0.5]))
    columns, rows, features = batch
    request = current.prepare(columns, rows, features)
    inference = infer(request)
    assert inference.shadow_error == "EngineError: challenger broke"
    scored = current.shape(columns, rows, request, inference)
    assert scored.shadow is None
    assert [r["decision"] for r in fraud_records(columns, scored)] == ["allow", "block"]


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.lists(
            st.sampled_from([0.0, -1.0, 1.0, 2.5, -0.0, float("nan"), float("inf"), float("-inf")])
            | st.floats(-10, 10, width=32),
            min_size=1,
            max_size=12,
        ),
        min_size=0,
        max_size=6,
    ),
    k=st.integers(0, 14),
    width=st.integers(1, 12),
)
def test_top_reasons_selects_what_a_stable_descending_sort_keeps(
    rows: list[list[float]], k: int, width: int
) -> None:
    # Ties (many equal values), NaN, infinities and k past the row width.
    contributions = np.array([(row * width)[:width] for row in rows], dtype=np.float32).reshape(
        len(rows), width
    )
    top, values, count = top_reasons(contributions, k)
    expected = np.argsort(-contributions, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top, expected)
    np.testing.assert_array_equal(values, np.take_along_axis(contributions, expected, axis=1))
    np.testing.assert_array_equal(count, (values > 0).sum(axis=1))


# --- the ranking kernels against the numpy code they replaced ------------------------------


def ranking_inputs_oracle(starts, rows, candidates, history, categories, slots, vocab, cats):
    """The numpy version `_ranking_inputs` replaced (Scorer.prepare before 2026-11-27)."""
    counts = starts[rows + 1] - starts[rows]
    ranked = np.flatnonzero(counts > 0)
    chunks = (counts[ranked] + slots - 1) // slots
    owners = np.repeat(np.arange(len(ranked)), chunks)
    index_in_event = np.arange(len(owners)) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    first = starts[rows[ranked]][owners] + index_in_event * slots
    last = (starts[rows[ranked] + 1])[owners]
    positions = first[:, None] + np.arange(slots)[None, :]
    filled = positions < last[:, None]
    padded = np.full((len(owners), slots), PAD, dtype=np.int64)
    padded[filled] = map_item_ids(candidates[positions[filled]], vocab)
    history_rows = ranked[owners]
    mapped_items = map_item_ids(history[history_rows], vocab)
    mapped_categories = map_item_ids(categories[history_rows], cats)
    return ranked, chunks, owners, first, mapped_items, mapped_categories, padded


def top_items_oracle(starts, rows, ranked, owners, first, scores, candidates, k):
    """Each ranked event's list scored from its ranking rows, then a stable descending sort
    of it (NaN last), its first k kept; zeros past the count.
    """
    items = np.zeros((len(ranked), k), dtype=np.int64)
    item_scores = np.zeros((len(ranked), k), dtype=np.float32)
    count = np.zeros(len(ranked), dtype=np.int64)
    for e, row in enumerate(ranked):
        lo, hi = starts[rows[row]], starts[rows[row] + 1]
        listed = np.empty(hi - lo, dtype=np.float32)
        for r in np.flatnonzero(owners == e):
            for s in range(scores.shape[1]):
                if first[r] + s < hi:
                    listed[first[r] + s - lo] = scores[r, s]
        order = np.argsort(-listed.astype(np.float64), kind="stable")[:k]
        count[e] = len(order)
        items[e, : len(order)] = candidates[lo + order]
        item_scores[e, : len(order)] = listed[order]
    return items, item_scores, count


ids = st.sampled_from([-2, -1, 0, 1, 2, 7, 99, 100, 10**12])


@settings(max_examples=300, deadline=None)
@given(
    lists=st.lists(st.lists(ids, max_size=9), max_size=7),
    scored=st.lists(st.booleans(), max_size=7),
    slots=st.integers(1, 4),
    k=st.integers(1, 5),
    length=st.integers(1, 3),
    values=st.lists(st.sampled_from([0.0, 0.5, 0.5, 1.0, -3.0, float("nan")]), min_size=1),
)
def test_the_ranking_kernels_equal_the_numpy_code_they_replaced(
    lists, scored, slots, k, length, values
):
    # Unknown, padding-like and huge ids; lists longer than the slots; rows not scored
    # (replays); tied and NaN scores.
    starts = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in lists], out=starts[1:])
    candidates = np.array([i for c in lists for i in c], dtype=np.int64)
    rows = np.array([i for i in range(len(lists)) if i < len(scored) and scored[i]], np.int64)
    history = np.tile(np.array([-1, 5, 150][:length], dtype=np.int64), (len(rows), 1))
    categories = np.full((len(rows), length), 3, dtype=np.int64)
    categories[:, 0] = -1
    vocab, cats = 100, 4
    ranked, chunks, owners, first, *expected = ranking_inputs_oracle(
        starts, rows, candidates, history, categories, slots, vocab, cats
    )
    total = int(chunks.sum())
    got_owners, got_first = np.empty(total, np.int64), np.empty(total, np.int64)
    got = [np.empty((total, length), np.int64) for _ in range(2)]
    got.append(np.empty((total, slots), np.int64))
    _ranking_inputs(
        starts, rows, ranked, chunks, candidates, history, categories, vocab, cats,
        got_owners, got_first, *got,
    )  # fmt: skip
    np.testing.assert_array_equal(got_owners, owners)
    np.testing.assert_array_equal(got_first, first)
    for got_array, expected_array in zip(got, expected, strict=True):
        np.testing.assert_array_equal(got_array, expected_array)

    scores = np.resize(np.array(values, dtype=np.float32), (total, slots))
    items, item_scores, count = (
        np.zeros((len(ranked), k), np.int64),
        np.zeros((len(ranked), k), np.float32),
        np.zeros(len(ranked), np.int64),
    )
    _top_items(starts, rows, ranked, owners, first, scores, candidates, items, item_scores, count)
    want = top_items_oracle(starts, rows, ranked, owners, first, scores, candidates, k)
    for got_array, expected_array in zip((items, item_scores, count), want, strict=True):
        np.testing.assert_array_equal(got_array, expected_array)

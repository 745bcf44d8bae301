"""Scores a batch: fraud for every event, a ranking for events that carry candidates.

Scoring is three steps so that inference can overlap the loop's other work: `prepare`
builds the engines' input arrays, `infer` runs only the engines (on the inference thread
when `processing.inference_depth` is 1 or more; ONNX Runtime and TensorRT release the GIL
while they run), and `shape` turns their outputs into the batch's score columns: decisions,
reasons, and each ranked event's top items. `score` is the three in a row. All of it works
on whole arrays; nothing is per event.

A challenger being shadow-scored (`Scorer.shadow`) runs on the same fraud inputs in the same
`infer`; its scores become `Scored.shadow`, written to the shadow topic and never a
decision. A shadow engine that fails leaves the batch's own scores alone: the failure is
carried in `Inference.shadow_error` for the pipeline to drop that challenger.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numba import njit

from engines.base import Engine, EngineError
from engines.vocabulary import FIRST_ID, OOV, PAD
from pipeline.serve.kernel import Float32s, Int64s, inline_kernel, kernel
from pipeline.serve.records import EventColumns, FeatureBatch, Scored, ShadowScored
from pipeline.serve.spec import FRAUD_CATEGORICAL, FRAUD_NUMERIC, feature_hash
from pipeline.settings import DecisionSettings, RankingSettings

REASON_NAMES = (*FRAUD_NUMERIC, *FRAUD_CATEGORICAL)


@dataclass(frozen=True, slots=True)
class Request:
    """One batch's engine inputs, split into engine-sized chunks, and the engines to run.

    The engines are fixed here, so a batch is scored and labelled by one model version
    even when a reload swaps the scorer's engines while it is in flight.
    """

    fraud: Engine
    ranking: Engine
    fraud_chunks: list[dict[str, np.ndarray]]
    ranking_chunks: list[dict[str, np.ndarray]]
    ranked: np.ndarray  # which of the batch's rows carry candidates
    owners: np.ndarray  # per ranking input row, its index in `ranked`
    first: np.ndarray  # per ranking input row, the position of its first candidate
    shadow: Engine | None = None  # a challenger run on `fraud_chunks` too


@dataclass(frozen=True, slots=True)
class Inference:
    """The engines' outputs for one Request, and the seconds they took."""

    probability: np.ndarray
    contributions: np.ndarray
    ranking_scores: np.ndarray | None
    seconds: float
    shadow_probability: np.ndarray | None = None
    shadow_contributions: np.ndarray | None = None
    shadow_error: str | None = None  # the shadow engine's failure, when it failed


class Scorer:
    """Runs the engines over feature batches and shapes their outputs into records."""

    def __init__(
        self,
        fraud: Engine,
        ranking: Engine,
        decision: DecisionSettings,
        ranking_settings: RankingSettings,
    ) -> None:
        """Score with `fraud` and `ranking`; decisions and list length from settings."""
        self._decision = decision
        self._top_k = ranking_settings.top_k
        _check_fraud(fraud)
        self.fraud = fraud
        self.ranking = ranking
        self.shadow: Engine | None = None
        self._items, self._categories, self._slots = _ranking_shape(ranking)

    def swap(self, role: str, engine: Engine) -> Engine:
        """Serve `engine` as the `fraud` or `ranking` model from the next batch on; return the
        engine it replaces. Raises EngineError, keeping the current one, when `engine` does
        not fit this build.
        """
        old: Engine
        if role == "fraud":
            _check_fraud(engine)
            old, self.fraud = self.fraud, engine
        else:
            shape = _ranking_shape(engine)
            old, self.ranking = self.ranking, engine
            self._items, self._categories, self._slots = shape
        return old

    def swap_shadow(self, engine: Engine | None) -> Engine | None:
        """Shadow-score with `engine` (None: stop) from the next batch on; return the one it
        replaces. Raises EngineError, keeping the current one, when it does not fit this
        build.
        """
        if engine is not None:
            _check_fraud(engine)
        old, self.shadow = self.shadow, engine
        return old

    def score(self, columns: EventColumns, rows: np.ndarray, features: FeatureBatch) -> Scored:
        """Fraud scores for all `rows` of `columns`, rankings for those with candidates."""
        request = self.prepare(columns, rows, features)
        return self.shape(columns, rows, request, infer(request))

    def prepare(self, columns: EventColumns, rows: np.ndarray, features: FeatureBatch) -> Request:
        """The engine inputs of `rows`, in chunks of each engine's max batch size.

        An event with more candidates than the model's slots takes several ranking rows:
        each candidate's score depends only on it and the history, so chunks are exact.
        """
        step = self.fraud.max_batch_size
        fraud_chunks: list[dict[str, np.ndarray]] = [
            {
                "numeric": features.numeric[start : start + step],
                "categorical": features.categorical[start : start + step],
            }
            for start in range(0, len(rows), step)
        ]
        starts = columns.candidate_start
        counts = starts[rows + 1] - starts[rows]
        ranked = np.flatnonzero(counts > 0)
        slots = self._slots
        chunks = (counts[ranked] + slots - 1) // slots
        total = int(chunks.sum())
        owners = np.empty(total, dtype=np.int64)
        first = np.empty(total, dtype=np.int64)
        length = features.history_items.shape[1]
        inputs = {
            "history_items": np.empty((total, length), dtype=np.int64),
            "history_categories": np.empty((total, length), dtype=np.int64),
            "candidate_items": np.empty((total, slots), dtype=np.int64),
        }
        _ranking_inputs(
            starts, rows, ranked, chunks, columns.candidates, features.history_items,
            features.history_categories, self._items, self._categories, owners, first,
            inputs["history_items"], inputs["history_categories"], inputs["candidate_items"],
        )  # fmt: skip
        step = self.ranking.max_batch_size
        ranking_chunks = [
            {name: value[start : start + step] for name, value in inputs.items()}
            for start in range(0, total, step)
        ]
        return Request(
            self.fraud,
            self.ranking,
            fraud_chunks,
            ranking_chunks,
            ranked,
            owners,
            first,
            self.shadow,
        )

    def shape(
        self, columns: EventColumns, rows: np.ndarray, request: Request, inference: Inference
    ) -> Scored:
        """Scores of `rows` from the outputs of `request`'s engines, as columns."""
        probability = inference.probability
        verdict, top, values, reason_count = self._decide(probability, inference.contributions)
        items, item_scores, item_count = self._rank(columns, rows, request, inference)
        shadow = None
        if (
            request.shadow is not None
            and inference.shadow_probability is not None
            and inference.shadow_contributions is not None
        ):
            shadow_probability = inference.shadow_probability
            shadow = ShadowScored(
                shadow_probability,
                *self._decide(shadow_probability, inference.shadow_contributions),
                fraud_model=(request.shadow.name, request.shadow.version),
            )
        return Scored(
            rows=rows,
            score=probability,
            decision=verdict,
            reasons=top,
            contributions=values,
            reason_count=reason_count,
            fraud_model=(request.fraud.name, request.fraud.version),
            ranked=request.ranked,
            items=items,
            item_scores=item_scores,
            item_count=item_count,
            ranking_model=(request.ranking.name, request.ranking.version),
            scored_time=int(time.time() * 1000),
            shadow=shadow,
        )

    def _decide(
        self, probability: np.ndarray, contributions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Decisions, the top reasons, their contributions and how many lead positive."""
        decision = self._decision
        top, values, reason_count = top_reasons(
            np.ascontiguousarray(contributions), decision.top_reasons
        )
        verdict = np.where(
            probability >= decision.block_threshold,
            2,
            np.where(probability >= decision.review_threshold, 1, 0),
        )
        return verdict.astype(np.int64), top, values, reason_count

    def _rank(
        self, columns: EventColumns, rows: np.ndarray, request: Request, inference: Inference
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per ranked event, its top_k candidates by score, best first (ties in list order,
        NaN last), their scores and how many there are; zeros past the count.
        """
        top_k = self._top_k
        ranked = request.ranked
        items = np.zeros((len(ranked), top_k), dtype=np.int64)
        item_scores = np.zeros((len(ranked), top_k), dtype=np.float32)
        item_count = np.zeros(len(ranked), dtype=np.int64)
        if len(ranked) and inference.ranking_scores is not None:
            _top_items(
                columns.candidate_start, rows, ranked, request.owners, request.first,
                inference.ranking_scores, columns.candidates, items, item_scores, item_count,
            )  # fmt: skip
        return items, item_scores, item_count


def infer(request: Request) -> Inference:
    """Run `request`'s engines: the only step that may run off the loop's thread."""
    started = time.perf_counter()
    # A batch with no row to score (all replays, say) still has two-dimensional reasons.
    probability = np.zeros(0, dtype=np.float32)
    contributions = np.zeros((0, 0), dtype=np.float32)
    if request.fraud_chunks:
        outputs = [request.fraud.infer(chunk) for chunk in request.fraud_chunks]
        probability = np.concatenate([out["score"] for out in outputs])
        contributions = np.concatenate([out["contributions"] for out in outputs])
    ranking = None
    if request.ranking_chunks:
        ranking = np.concatenate(
            [request.ranking.infer(chunk)["scores"] for chunk in request.ranking_chunks]
        )
    shadow_probability = shadow_contributions = None
    shadow_error = None
    if request.shadow is not None:
        shadow_probability, shadow_contributions = probability, contributions  # no rows
        try:
            if request.fraud_chunks:
                outputs = [request.shadow.infer(chunk) for chunk in request.fraud_chunks]
                shadow_probability = np.concatenate([out["score"] for out in outputs])
                shadow_contributions = np.concatenate([out["contributions"] for out in outputs])
        # Any failure of the challenger must not cost the champion's scores: it is carried
        # out as data and the pipeline stops shadowing that version.
        except Exception as exc:
            shadow_probability = shadow_contributions = None
            shadow_error = f"{type(exc).__name__}: {exc}"
    return Inference(
        probability,
        contributions,
        ranking,
        time.perf_counter() - started,
        shadow_probability,
        shadow_contributions,
        shadow_error,
    )


class InferenceThread:
    """Runs `infer` on one worker thread, in submission order; with `depth` 0, inline.

    The loop keeps at most `depth` batches in flight here (the bound is the caller's queue),
    so the engines work on one batch while the loop decodes and featurises the next.
    """

    def __init__(self, depth: int) -> None:
        """A worker thread when `depth` > 0."""
        self.depth = depth
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference") if depth else None
        )

    @property
    def inline(self) -> bool:
        """Whether inference runs on the caller's thread (`depth` 0)."""
        return self._executor is None

    def submit(self, request: Request) -> Future[Inference]:
        """Start `request`; its future holds the Inference or the engine's exception."""
        if self._executor is not None:
            return self._executor.submit(infer, request)
        future: Future[Inference] = Future()
        try:
            future.set_result(infer(request))
        except Exception as exc:  # raised to the caller by result(), as from the thread
            future.set_exception(exc)
        return future

    def close(self) -> None:
        """Wait for the running inference and stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


def _check_fraud(engine: Engine) -> None:
    """A fraud model must have been trained on the features this build computes."""
    trained_on = engine.manifest.get("feature_hash")
    if trained_on != feature_hash():
        raise EngineError(
            f"model {engine.name} v{engine.version} was trained on features {trained_on}, "
            f"but this build computes {feature_hash()}: retrain or pin a matching version"
        )


def _ranking_shape(engine: Engine) -> tuple[int, int, int]:
    """Item vocabulary, category vocabulary and candidate slots from a ranking manifest."""
    manifest = engine.manifest
    try:
        return (
            int(manifest["item_vocabulary"]),
            int(manifest["category_vocabulary"]),
            int(manifest["candidates"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(
            f"model {engine.name} v{engine.version} lacks a ranking manifest field: {exc}"
        ) from exc


@njit(cache=True, nogil=True, inline="always")
def _better(a: float, b: float) -> bool:
    """`a` sorts before `b` in a descending order that puts NaN last."""
    return not np.isnan(a) and (np.isnan(b) or a > b)


@inline_kernel
def _keep_best(
    x: float, label: int, labels: np.ndarray, values: np.ndarray, row: int, kept: int
) -> int:
    """Offer (`label`, `x`) to row `row` of `labels` and `values`, which holds the best
    `kept` offered so far, best first, at most as many as the row is wide: what a stable
    descending sort of the offers keeps (ties: the earlier first; NaN last). Returns how
    many it holds now.
    """
    k: int = values.shape[1]
    if kept == k and not _better(x, values[row, k - 1]):
        return kept  # a later equal value never displaces an earlier one
    at = min(kept, k - 1)
    while at > 0 and _better(x, values[row, at - 1]):
        at -= 1
    for q in range(min(kept, k - 1), at, -1):
        labels[row, q] = labels[row, q - 1]
        values[row, q] = values[row, q - 1]
    labels[row, at] = label
    values[row, at] = x
    return min(kept + 1, k)


@njit(cache=True, nogil=True)
def top_reasons(contributions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the columns of the `k` largest contributions, largest first (ties: the lower
    column first; NaN last), their values, and how many of them are positive: what
    `np.argsort(-contributions, axis=1, kind="stable")[:, :k]` selects. Sorting every row's
    40 contributions to keep 3 cost about 0.9 µs an event; one pass keeps the best k.
    """
    n, m = contributions.shape
    k = min(k, m)
    top = np.empty((n, k), dtype=np.int64)
    values = np.empty((n, k), dtype=contributions.dtype)
    count = np.zeros(n, dtype=np.int64)
    if k == 0:
        return top, values, count
    for i in range(n):
        kept = 0
        for j in range(m):
            kept = _keep_best(contributions[i, j], j, top, values, i, kept)
        for r in range(k):
            if values[i, r] > 0:
                count[i] += 1
    return top, values, count


def warm_kernels() -> None:
    """Run this module's kernels once on one-row inputs of the types serving passes."""
    one, grid = np.zeros(1, dtype=np.int64), np.zeros((1, 1), dtype=np.int64)
    starts = np.array([0, 1], dtype=np.int64)
    _ranking_inputs(
        starts, one, one, np.ones(1, dtype=np.int64), one, grid, grid, 1, 1, one.copy(),
        one.copy(), grid.copy(), grid.copy(), grid.copy(),
    )  # fmt: skip
    scores = np.zeros((1, 1), dtype=np.float32)
    _top_items(starts, one, one, one, one, scores, one, grid.copy(), scores.copy(), one.copy())
    top_reasons(scores, 1)


@inline_kernel
def _embedding_row(item: int, vocabulary: int) -> int:
    """`engines.vocabulary.map_item_ids` of one id: pad (-1) → PAD, unknown → OOV."""
    if item == -1:
        return PAD
    return item + FIRST_ID if 0 <= item < vocabulary else OOV


@kernel
def _ranking_inputs(
    starts: Int64s,
    rows: Int64s,
    ranked: Int64s,
    chunks: Int64s,
    candidates: Int64s,
    history_items: Int64s,
    history_categories: Int64s,
    item_vocabulary: int,
    category_vocabulary: int,
    owners: Int64s,
    first: Int64s,
    out_items: Int64s,
    out_categories: Int64s,
    out_candidates: Int64s,
) -> None:
    """The ranking model's input rows: `chunks[e]` rows for ranked event e (a list longer
    than the model's slots is split), each with the event's history and the next slots'
    worth of its candidates, padded; `owners` and `first` say whose and from where. The
    numpy version this replaced (about 130 µs a batch in its many small calls) is its
    oracle in tests.
    """
    slots = out_candidates.shape[1]
    length = out_items.shape[1]
    r = 0
    for e in range(len(ranked)):
        row = ranked[e]
        at, last = starts[rows[row]], starts[rows[row] + 1]
        for _ in range(chunks[e]):
            owners[r] = e
            first[r] = at
            for j in range(length):
                out_items[r, j] = _embedding_row(history_items[row, j], item_vocabulary)
                out_categories[r, j] = _embedding_row(
                    history_categories[row, j], category_vocabulary
                )
            for s in range(slots):
                position = at + s
                out_candidates[r, s] = (
                    _embedding_row(candidates[position], item_vocabulary)
                    if position < last
                    else PAD
                )
            at += slots
            r += 1


@kernel
def _top_items(
    starts: Int64s,
    rows: Int64s,
    ranked: Int64s,
    owners: Int64s,
    first: Int64s,
    scores: Float32s,
    candidates: Int64s,
    items: Int64s,
    item_scores: Float32s,
    item_count: Int64s,
) -> None:
    """Per ranked event, the `items.shape[1]` best of its candidates by the scores of its
    ranking rows, best first: what a stable descending sort of each list keeps (NaN last),
    in one pass that keeps the best k, as `top_reasons` does.
    """
    r = 0
    for e in range(len(ranked)):
        last = starts[rows[ranked[e]] + 1]
        kept = 0
        while r < len(owners) and owners[r] == e:
            for s in range(scores.shape[1]):
                position = first[r] + s
                if position >= last:
                    break
                kept = _keep_best(scores[r, s], candidates[position], items, item_scores, e, kept)
            r += 1
        item_count[e] = kept

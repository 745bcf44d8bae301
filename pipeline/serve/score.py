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
from engines.vocabulary import PAD, map_item_ids
from pipeline.serve.features import FRAUD_CATEGORICAL, FRAUD_NUMERIC, FeatureBatch
from pipeline.serve.features.spec import feature_hash
from pipeline.serve.records import EventColumns, Scored, ShadowScored
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
        fraud_chunks = [
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
        owners = np.repeat(np.arange(len(ranked)), chunks)
        # Chunk j of an event starts j * slots candidates into its list.
        index_in_event = np.arange(len(owners)) - np.repeat(np.cumsum(chunks) - chunks, chunks)
        first = starts[rows[ranked]][owners] + index_in_event * slots
        ranking_chunks: list[dict[str, np.ndarray]] = []
        if len(owners):
            last = (starts[rows[ranked] + 1])[owners]
            positions = first[:, None] + np.arange(slots)[None, :]
            filled = positions < last[:, None]
            padded = np.full((len(owners), slots), PAD, dtype=np.int64)
            padded[filled] = map_item_ids(columns.candidates[positions[filled]], self._items)
            history_rows = ranked[owners]
            inputs = {
                "history_items": map_item_ids(features.history_items[history_rows], self._items),
                "history_categories": map_item_ids(
                    features.history_categories[history_rows], self._categories
                ),
                "candidate_items": padded,
            }
            step = self.ranking.max_batch_size
            ranking_chunks = [
                {name: value[start : start + step] for name, value in inputs.items()}
                for start in range(0, len(owners), step)
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
        """Per ranked event, its top_k candidates by score, best first (ties in list order)."""
        top_k = self._top_k
        ranked = request.ranked
        if not len(ranked) or inference.ranking_scores is None:
            empty = np.zeros((0, top_k))
            return empty.astype(np.int64), empty.astype(np.float32), np.zeros(0, np.int64)
        starts = columns.candidate_start
        first, last = starts[rows[ranked]], starts[rows[ranked] + 1]
        counts = last - first
        width = int(counts.max())
        # Each event's candidates and their scores, padded to the longest list.
        flat = np.empty(len(columns.candidates), dtype=np.float32)
        chunk_positions = request.first[:, None] + np.arange(self._slots)[None, :]
        filled = chunk_positions < last[request.owners][:, None]
        flat[chunk_positions[filled]] = inference.ranking_scores[filled]
        positions = first[:, None] + np.arange(width)[None, :]
        present = positions < last[:, None]
        positions = np.where(present, positions, 0)
        scores = np.where(present, flat[positions], np.float32(0))
        key = np.where(present, -scores.astype(np.float64), np.inf)
        order = np.argsort(key, axis=1, kind="stable")[:, :top_k]
        chosen = np.take_along_axis(positions, order, axis=1)
        item_count = np.minimum(counts, top_k)
        items = columns.candidates[chosen]
        item_scores = np.take_along_axis(scores, order, axis=1)
        if items.shape[1] < top_k:  # every list shorter than top_k
            pad = top_k - items.shape[1]
            items = np.pad(items, ((0, 0), (0, pad)))
            item_scores = np.pad(item_scores, ((0, 0), (0, pad)))
        return items, item_scores, item_count.astype(np.int64)


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
        row = contributions[i]
        kept = 0
        for j in range(m):
            x = row[j]
            if kept == k and not _better(x, values[i, k - 1]):
                continue  # a later equal value never displaces an earlier one
            at = min(kept, k - 1)
            while at > 0 and _better(x, values[i, at - 1]):
                at -= 1
            for q in range(min(kept, k - 1), at, -1):
                top[i, q] = top[i, q - 1]
                values[i, q] = values[i, q - 1]
            top[i, at] = j
            values[i, at] = x
            kept = min(kept + 1, k)
        for r in range(k):
            if values[i, r] > 0:
                count[i] += 1
    return top, values, count

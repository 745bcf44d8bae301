"""Scores a batch: fraud for every event, a ranking for events that carry candidates.

Scoring is three steps so that inference can overlap the loop's other work: `prepare`
builds the engines' input arrays, `infer` runs only the engines (on the inference thread
when `processing.inference_depth` is 1 or more; ONNX Runtime and TensorRT release the GIL
while they run), and `shape` turns their outputs into records. `score` is the three in a
row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.base import Engine, EngineError
from engines.models import map_item_ids
from engines.models.ranking import PAD
from pipeline.events import ClickEvent
from pipeline.features import FRAUD_CATEGORICAL, FRAUD_NUMERIC, FeatureBatch
from pipeline.features.spec import feature_hash
from pipeline.settings import DecisionSettings, RankingSettings

REASON_NAMES = (*FRAUD_NUMERIC, *FRAUD_CATEGORICAL)
DECISIONS = ("allow", "review", "block")


@dataclass(frozen=True, slots=True)
class Scored:
    """Output records of one batch, ready to encode."""

    fraud_scores: list[dict[str, Any]]
    recommendations: list[dict[str, Any]]


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
    owners: list[int]  # per ranking input row, its event's row
    candidates: list[list[int]]  # per ranking input row, the candidate ids it holds


@dataclass(frozen=True, slots=True)
class Inference:
    """The engines' outputs for one Request, and the seconds they took."""

    probability: np.ndarray
    contributions: np.ndarray
    ranking_scores: np.ndarray | None
    seconds: float


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

    def score(self, events: Sequence[ClickEvent], features: FeatureBatch) -> Scored:
        """Fraud records for all `events`, recommendations for those with candidates."""
        request = self.prepare(events, features)
        return self.shape(events, request, infer(request))

    def prepare(self, events: Sequence[ClickEvent], features: FeatureBatch) -> Request:
        """The engine inputs of `events`, in chunks of each engine's max batch size."""
        step = self.fraud.max_batch_size
        fraud_chunks = [
            {
                "numeric": features.numeric[start : start + step],
                "categorical": features.categorical[start : start + step],
            }
            for start in range(0, len(events), step)
        ]
        ranked = [i for i, event in enumerate(events) if event.candidates]
        owners: list[int] = []
        candidates: list[list[int]] = []
        ranking_chunks: list[dict[str, np.ndarray]] = []
        if ranked:
            owners, candidates, inputs = self._ranking_inputs(events, features, ranked)
            step = self.ranking.max_batch_size
            ranking_chunks = [
                {name: value[start : start + step] for name, value in inputs.items()}
                for start in range(0, len(owners), step)
            ]
        return Request(self.fraud, self.ranking, fraud_chunks, ranking_chunks, owners, candidates)

    def shape(self, events: Sequence[ClickEvent], request: Request, inference: Inference) -> Scored:
        """Records of `events` from the outputs of `request`'s engines."""
        if not events:
            return Scored([], [])
        now = int(time.time() * 1000)
        fraud = self._fraud_records(
            events, request.fraud, inference.probability, inference.contributions, now
        )
        recommendations = []
        if inference.ranking_scores is not None:
            recommendations = self._recommendations(events, request, inference.ranking_scores, now)
        return Scored(fraud, recommendations)

    def _fraud_records(
        self,
        events: Sequence[ClickEvent],
        engine: Engine,
        probability: np.ndarray,
        contributions: np.ndarray,
        now: int,
    ) -> list[dict[str, Any]]:
        """One FraudScore record per event; reasons and decisions computed for the whole batch
        with numpy, then read back as Python lists (one conversion, not one per value).
        """
        decision = self._decision
        top = np.argsort(-contributions, axis=1)[:, : decision.top_reasons]
        top_values = np.take_along_axis(contributions, top, axis=1).tolist()
        verdict = np.where(
            probability >= decision.block_threshold,
            2,
            np.where(probability >= decision.review_threshold, 1, 0),
        ).tolist()
        scores = probability.tolist()
        name, version = engine.name, engine.version
        return [
            {
                "event_id": event.event_id,
                "user_id": event.user_id,
                "event_time": event.event_time,
                "score": scores[i],
                "decision": DECISIONS[verdict[i]],
                "reasons": [
                    {"feature": REASON_NAMES[j], "contribution": value}
                    for j, value in zip(columns, top_values[i], strict=True)
                    if value > 0
                ],
                "model_name": name,
                "model_version": version,
                "ingest_time": event.ingest_time,
                "scored_time": now,
            }
            for i, (event, columns) in enumerate(zip(events, top.tolist(), strict=True))
        ]

    def _ranking_inputs(
        self, events: Sequence[ClickEvent], features: FeatureBatch, rows: list[int]
    ) -> tuple[list[int], list[list[int]], dict[str, np.ndarray]]:
        # An event with more candidates than the model's slots takes several rows: each
        # candidate's score depends only on it and the history, so chunks are exact.
        owners: list[int] = []
        chunks: list[list[int]] = []
        for row in rows:
            candidates = events[row].candidates
            for start in range(0, len(candidates), self._slots):
                owners.append(row)
                chunks.append(candidates[start : start + self._slots])
        padded = np.full((len(chunks), self._slots), PAD, dtype=np.int64)
        for k, chunk in enumerate(chunks):
            padded[k, : len(chunk)] = map_item_ids(np.asarray(chunk, dtype=np.int64), self._items)
        owner_rows = np.asarray(owners)
        inputs = {
            "history_items": map_item_ids(features.history_items[owner_rows], self._items),
            "history_categories": map_item_ids(
                features.history_categories[owner_rows], self._categories
            ),
            "candidate_items": padded,
        }
        return owners, chunks, inputs

    def _recommendations(
        self, events: Sequence[ClickEvent], request: Request, scores: np.ndarray, now: int
    ) -> list[dict[str, Any]]:
        per_event: dict[int, list[tuple[int, float]]] = {}
        for k, row in enumerate(request.owners):
            pairs = per_event.setdefault(row, [])
            # Only the first len(chunk) slots hold candidates; the rest is padding.
            pairs.extend(
                (item, float(s)) for item, s in zip(request.candidates[k], scores[k], strict=False)
            )
        return [
            self._recommendation(events[row], request.ranking, pairs, now)
            for row, pairs in per_event.items()
        ]

    def _recommendation(
        self, event: ClickEvent, engine: Engine, pairs: list[tuple[int, float]], now: int
    ) -> dict[str, Any]:
        pairs.sort(key=lambda pair: -pair[1])
        return {
            "event_id": event.event_id,
            "user_id": event.user_id,
            "event_time": event.event_time,
            "items": [{"item_id": item, "score": s} for item, s in pairs[: self._top_k]],
            "model_name": engine.name,
            "model_version": engine.version,
            "ingest_time": event.ingest_time,
            "scored_time": now,
        }


def infer(request: Request) -> Inference:
    """Run `request`'s engines: the only step that may run off the loop's thread."""
    started = time.perf_counter()
    probability = contributions = np.zeros(0, dtype=np.float32)
    if request.fraud_chunks:
        outputs = [request.fraud.infer(chunk) for chunk in request.fraud_chunks]
        probability = np.concatenate([out["score"] for out in outputs])
        contributions = np.concatenate([out["contributions"] for out in outputs])
    ranking = None
    if request.ranking_chunks:
        ranking = np.concatenate(
            [request.ranking.infer(chunk)["scores"] for chunk in request.ranking_chunks]
        )
    return Inference(probability, contributions, ranking, time.perf_counter() - started)


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

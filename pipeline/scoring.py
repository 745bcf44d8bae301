"""Scores a batch: fraud for every event, a ranking for events that carry candidates."""

from __future__ import annotations

import time
from collections.abc import Sequence
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
        if not events:
            return Scored([], [])
        probability, contributions = self._fraud(features)
        now = int(time.time() * 1000)
        fraud = self._fraud_records(events, probability, contributions, now)
        ranked = [i for i, event in enumerate(events) if event.candidates]
        recommendations = self._recommend(events, features, ranked, now) if ranked else []
        return Scored(fraud, recommendations)

    def _fraud(self, features: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        scores, contributions = [], []
        step = self.fraud.max_batch_size
        for start in range(0, len(features.numeric), step):
            out = self.fraud.infer(
                {
                    "numeric": features.numeric[start : start + step],
                    "categorical": features.categorical[start : start + step],
                }
            )
            scores.append(out["score"])
            contributions.append(out["contributions"])
        return np.concatenate(scores), np.concatenate(contributions)

    def _fraud_records(
        self,
        events: Sequence[ClickEvent],
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
        name, version = self.fraud.name, self.fraud.version
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

    def _recommend(
        self, events: Sequence[ClickEvent], features: FeatureBatch, rows: list[int], now: int
    ) -> list[dict[str, Any]]:
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
        scores = self._infer_ranking(inputs)
        per_event: dict[int, list[tuple[int, float]]] = {}
        for k, row in enumerate(owners):
            pairs = per_event.setdefault(row, [])
            # Only the first len(chunk) slots hold candidates; the rest is padding.
            pairs.extend((item, float(s)) for item, s in zip(chunks[k], scores[k], strict=False))
        return [self._recommendation(events[row], pairs, now) for row, pairs in per_event.items()]

    def _infer_ranking(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        step = self.ranking.max_batch_size
        total = len(inputs["candidate_items"])
        parts = [
            self.ranking.infer({k: v[start : start + step] for k, v in inputs.items()})["scores"]
            for start in range(0, total, step)
        ]
        return np.concatenate(parts)

    def _recommendation(
        self, event: ClickEvent, pairs: list[tuple[int, float]], now: int
    ) -> dict[str, Any]:
        pairs.sort(key=lambda pair: -pair[1])
        return {
            "event_id": event.event_id,
            "user_id": event.user_id,
            "event_time": event.event_time,
            "items": [{"item_id": item, "score": s} for item, s in pairs[: self._top_k]],
            "model_name": self.ranking.name,
            "model_version": self.ranking.version,
            "ingest_time": event.ingest_time,
            "scored_time": now,
        }


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

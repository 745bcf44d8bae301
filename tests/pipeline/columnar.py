"""Columnar batches for unit tests, and the scored records as dicts: the pure-Python shape
of the outputs that the encode kernel is checked against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import schemas
from pipeline.serve.decode import OK, BatchDecoder
from pipeline.serve.features import Featurizer
from pipeline.serve.records import DECISIONS, TIME, EventColumns, FeatureBatch, Scored
from pipeline.serve.score import REASON_NAMES
from pipeline.serve.state import Pseudonyms, UserTable
from pipeline.settings import LimitSettings
from schemas.codec import Encoder
from tests.pipeline.sample import NOW_MS

ENCODER = Encoder(schemas.CLICK_EVENT)
LIMITS = LimitSettings(max_event_age_s=1e12, max_future_skew_s=1e12)


def columns_of(*records: dict[str, Any], partition: int = 0) -> EventColumns:
    """`records` as a decoded batch at offsets 0, 1, ..."""
    columns, rejected = BatchDecoder(LIMITS).decode_values(
        [ENCODER.encode(r) for r in records],
        [r["user_id"].encode() for r in records],
        np.array([(partition, i, NOW_MS) for i in range(len(records))], dtype=np.int64).reshape(
            len(records), 3
        ),
        NOW_MS,
    )
    assert not rejected and (columns.status == OK).all()
    return columns


def featurised(*records: dict[str, Any]) -> tuple[EventColumns, np.ndarray, FeatureBatch]:
    """A decoded batch of `records`, all rows, and their features from empty state."""
    columns = columns_of(*records)
    rows, features = Featurizer(UserTable(5), Pseudonyms.ephemeral(), 1800).process(
        columns, np.arange(len(records), dtype=np.int64)
    )
    return columns, rows, features


def fraud_records(columns: EventColumns, scored: Scored) -> list[dict[str, Any]]:
    """The FraudScore records of `scored`, as fastavro takes them."""
    out = []
    for i, row in enumerate(scored.rows.tolist()):
        count = int(scored.reason_count[i])
        out.append(
            {
                "event_id": columns.text(row, 0),
                "user_id": columns.text(row, 1),
                "event_time": int(columns.longs[row, TIME]),
                "score": float(scored.score[i]),
                "decision": DECISIONS[scored.decision[i]],
                "reasons": [
                    {"feature": REASON_NAMES[j], "contribution": float(v)}
                    for j, v in zip(
                        scored.reasons[i, :count].tolist(),
                        scored.contributions[i, :count].tolist(),
                        strict=True,
                    )
                ],
                "model_name": scored.fraud_model[0],
                "model_version": scored.fraud_model[1],
                "ingest_time": int(columns.ingest_time[row]),
                "scored_time": scored.scored_time,
            }
        )
    return out


def recommendation_records(columns: EventColumns, scored: Scored) -> list[dict[str, Any]]:
    """The Recommendation records of `scored`, as fastavro takes them."""
    out = []
    for k, i in enumerate(scored.ranked.tolist()):
        row = int(scored.rows[i])
        count = int(scored.item_count[k])
        out.append(
            {
                "event_id": columns.text(row, 0),
                "user_id": columns.text(row, 1),
                "event_time": int(columns.longs[row, TIME]),
                "items": [
                    {"item_id": int(item), "score": float(score)}
                    for item, score in zip(
                        scored.items[k, :count].tolist(),
                        scored.item_scores[k, :count].tolist(),
                        strict=True,
                    )
                ],
                "model_name": scored.ranking_model[0],
                "model_version": scored.ranking_model[1],
                "ingest_time": int(columns.ingest_time[row]),
                "scored_time": scored.scored_time,
            }
        )
    return out

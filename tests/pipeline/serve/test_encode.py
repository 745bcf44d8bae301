"""The output kernel against its oracle: fastavro's bytes for the same records."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from pipeline.serve.encode import OutputEncoder
from pipeline.serve.records import Scored, ShadowScored
from pipeline.serve.score import REASON_NAMES
from schemas.codec import Encoder
from tests.pipeline.columnar import columns_of, fraud_records, recommendation_records
from tests.pipeline.sample import NOW_MS, click_record

TOP_REASONS, TOP_K = 3, 4
LONGS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FLOAT32 = st.floats(width=32, allow_nan=False)


@st.composite
def scored_batches(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    n = draw(st.integers(1, 6))
    records = [
        click_record(
            event_id=draw(st.text(min_size=1, max_size=30)),
            user_id=draw(st.sampled_from(["u1", "ü-2", "x" * 60])),
            event_time=draw(st.integers(NOW_MS - 10**14, NOW_MS + 10**14)),
        )
        for _ in range(n)
    ]
    columns = columns_of(*records)
    rows = np.array(sorted(draw(st.sets(st.integers(0, n - 1), min_size=1))), dtype=np.int64)
    m = len(rows)
    ranked = np.array(sorted(draw(st.sets(st.integers(0, m - 1)))), dtype=np.int64)

    def fraud_columns():  # type: ignore[no-untyped-def]
        arrays = st.lists(FLOAT32, min_size=m * TOP_REASONS, max_size=m * TOP_REASONS)
        reasons = st.lists(
            st.integers(0, len(REASON_NAMES) - 1),
            min_size=m * TOP_REASONS,
            max_size=m * TOP_REASONS,
        )
        return {
            "score": np.array(draw(st.lists(FLOAT32, min_size=m, max_size=m)), dtype=np.float32),
            "decision": np.array(draw(st.lists(st.integers(0, 2), min_size=m, max_size=m))),
            "reasons": np.array(draw(reasons)).reshape(m, TOP_REASONS),
            "contributions": np.array(draw(arrays), dtype=np.float32).reshape(m, TOP_REASONS),
            "reason_count": np.array(draw(st.lists(st.integers(0, 3), min_size=m, max_size=m))),
            "fraud_model": (draw(st.text(max_size=10)), draw(st.text(max_size=5))),
        }

    scored = Scored(
        rows=rows,
        **fraud_columns(),
        ranked=ranked,
        items=np.array(
            draw(st.lists(LONGS, min_size=len(ranked) * TOP_K, max_size=len(ranked) * TOP_K)),
            dtype=np.int64,
        ).reshape(len(ranked), TOP_K),
        item_scores=np.array(
            draw(st.lists(FLOAT32, min_size=len(ranked) * TOP_K, max_size=len(ranked) * TOP_K)),
            dtype=np.float32,
        ).reshape(len(ranked), TOP_K),
        item_count=np.array(
            draw(st.lists(st.integers(0, TOP_K), min_size=len(ranked), max_size=len(ranked))),
            dtype=np.int64,
        ),
        ranking_model=(draw(st.text(max_size=10)), draw(st.text(max_size=5))),
        scored_time=draw(LONGS),
        shadow=ShadowScored(**fraud_columns()) if draw(st.booleans()) else None,
    )
    return columns, scored


def split(data: bytes, starts: list[int]) -> list[bytes]:
    return [data[starts[i] : starts[i + 1]] for i in range(len(starts) - 1)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scored_batches())
def test_encoded_bytes_equal_fastavros(batch):
    columns, scored = batch
    encoded = OutputEncoder().encode(columns, scored)
    fraud, recommendation = Encoder(schemas.FRAUD_SCORE), Encoder(schemas.RECOMMENDATION)
    assert split(encoded.fraud, encoded.fraud_starts) == [
        fraud.encode(r) for r in fraud_records(columns, scored)
    ]
    assert split(encoded.recommendations, encoded.recommendation_starts) == [
        recommendation.encode(r) for r in recommendation_records(columns, scored)
    ]
    # A challenger's records: the same rows and times, its own scores, reasons and version.
    shadow = scored.shadow
    as_served = (
        scored
        if shadow is None
        else dataclasses.replace(
            scored,
            score=shadow.score,
            decision=shadow.decision,
            reasons=shadow.reasons,
            contributions=shadow.contributions,
            reason_count=shadow.reason_count,
            fraud_model=shadow.fraud_model,
        )
    )
    assert split(encoded.shadow, encoded.shadow_starts) == (
        [] if shadow is None else [fraud.encode(r) for r in fraud_records(columns, as_served)]
    )

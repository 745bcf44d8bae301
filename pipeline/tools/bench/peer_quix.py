"""The peer: the same job written with Quix Streams in its idiomatic style.

Per-user state lives in Quix's RocksDB state (with its changelog topics); each event is
decoded by a Quix deserializer, its features are computed by streamscore's own feature code
from that state (so the work matches event for event), it is scored by the fraud model with
ONNX Runtime, and the FraudScore goes out through `to_topic`. At least once, Quix's defaults
otherwise.

Quix Streams pins confluent-kafka 2.12, which conflicts with ours, so this module runs in its
own virtualenv (`phases.ensure_peer_venv`) with the repository on PYTHONPATH:
`<peer-venv>/bin/python -m pipeline.tools.bench.peer_quix`.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastavro import schemaless_reader, schemaless_writer
from quixstreams import Application, State
from quixstreams.models.serializers import Deserializer, Serializer
from quixstreams.state.rocksdb import RocksDBOptions

import schemas
from engines.registry import resolve
from pipeline.serve.events import ClickEvent
from pipeline.serve.features import FeatureUpdater
from pipeline.serve.state import FeatureStore, Pseudonyms
from pipeline.settings import load_settings

_HEADER = 5  # magic byte and schema id of the Confluent framing


class AvroIn(Deserializer):  # type: ignore[misc]
    """Confluent-framed Avro ClickEvent → dict."""

    def __init__(self) -> None:
        super().__init__()
        self._schema = schemas.load(schemas.CLICK_EVENT).parsed

    def __call__(self, value: bytes, ctx: Any) -> Any:
        body = io.BytesIO(value)
        body.seek(_HEADER)
        return schemaless_reader(body, self._schema, None)


class AvroOut(Serializer):  # type: ignore[misc]
    """dict → Confluent-framed Avro FraudScore."""

    def __init__(self) -> None:
        schema = schemas.load(schemas.FRAUD_SCORE)
        self._schema = schema.parsed
        self._header = bytes([0]) + schema.schema_id.to_bytes(4, "big")

    def __call__(self, value: Any, ctx: Any) -> bytes:
        out = io.BytesIO()
        out.write(self._header)
        schemaless_writer(out, self._schema, value)
        return out.getvalue()


def main() -> None:
    """Build the Quix application from the STREAMSCORE_* settings and run it until SIGTERM."""
    settings = load_settings()
    artifact = resolve(settings.engine.model_dir, settings.engine.fraud_model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(artifact.onnx_path), options, ["CPUExecutionProvider"])
    features = settings.features
    scratch = FeatureStore(features.history_length)
    updater = FeatureUpdater(
        scratch, Pseudonyms.ephemeral(), features.session_gap_s, features.allowed_lateness_s
    )

    def score(value: dict[str, Any], key: bytes, timestamp: int, headers: Any, state: State) -> Any:
        user = value["user_id"]
        scratch.restore(0, user, state.get(b"user"))
        event = ClickEvent(**value, ingest_time=timestamp)
        batch = updater.process([event])
        state.set(b"user", scratch.peek(0, user).to_bytes())  # type: ignore[union-attr]
        scratch.restore(0, user, None)
        probability, _ = session.run(
            None, {"numeric": batch.numeric, "categorical": batch.categorical}
        )
        return {
            "event_id": value["event_id"],
            "user_id": user,
            "event_time": value["event_time"],
            "score": float(np.asarray(probability)[0]),
            "decision": "allow",
            "reasons": [],
            "model_name": artifact.name,
            "model_version": artifact.version,
            "ingest_time": timestamp,
            "scored_time": int(time.time() * 1000),
        }

    app = Application(
        broker_address=settings.kafka.bootstrap_servers,
        consumer_group=settings.consumer.group_id,
        auto_offset_reset="earliest",
        processing_guarantee="at-least-once",
        state_dir=Path("var/bench/peer-state") / settings.consumer.group_id,  # cwd: the repo
        # State keys and values are bytes (streamscore's own state encoding), stored as is.
        rocksdb_options=RocksDBOptions(dumps=lambda v: v, loads=lambda b: b),
        loglevel="WARNING",
    )
    source = app.topic(settings.topics.input, key_deserializer="bytes", value_deserializer=AvroIn())
    sink = app.topic(
        settings.topics.fraud_scores, key_serializer="bytes", value_serializer=AvroOut()
    )
    sdf = app.dataframe(source)
    sdf = sdf.apply(score, stateful=True, metadata=True)
    sdf.to_topic(sink)
    app.run()


if __name__ == "__main__":
    main()

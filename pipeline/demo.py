"""`streamscore demo`: the whole job end to end on fresh topics, then a summary.

The pipeline runs as its own `streamscore run` process while events are produced at a fixed
rate, so latency is real end to end: from the input's Kafka timestamp to the output's.
Throughput is events over the pipeline's busy time, its capacity rather than the set rate.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import schemas
from engines import metrics
from engines.train import TrainConfig, needs_training, train_all
from pipeline.codec import Decoder
from pipeline.generator import GeneratorConfig
from pipeline.kafka.admin import (
    admin_client,
    committed_offsets,
    create_topics,
    end_offsets,
    topic_partitions,
)
from pipeline.loadgen import produce_clickstream
from pipeline.settings import Settings, settings_env

DEMO_DIR = Path("var/demo")
MALFORMED_EVERY = 1000


def run_demo(
    settings: Settings, events: int, rate: float, users: int, console: Console
) -> dict[str, Any]:
    """Run the demo and return (and write) its summary."""
    run_id = time.strftime("%Y%m%d-%H%M%S")
    settings = _demo_settings(settings, run_id)
    create_topics(settings)
    ensure_models(settings, console)
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    stats_file = DEMO_DIR / "run-stats.json"
    stats_file.unlink(missing_ok=True)
    pipeline = _start_pipeline(settings, stats_file)
    try:
        _wait_until_joined(settings, pipeline, timeout_s=120)
        config = GeneratorConfig(events=events, users=users, seed=7).anchored_before(time.time())
        with Progress(console=console) as progress:
            task = progress.add_task(f"producing at {rate:.0f}/s", total=events)
            report = produce_clickstream(
                settings, config, rate, MALFORMED_EVERY, lambda n: progress.advance(task, n)
            )
            _wait_until_consumed(settings, pipeline, timeout_s=120 + events / 500)
    except BaseException:
        pipeline.kill()
        raise
    _stop(pipeline)
    summary = _summarise(settings, json.loads(stats_file.read_text()), report.with_candidates)
    (DEMO_DIR / "summary.json").write_text(json.dumps(summary, indent=2))
    _print(summary, console)
    return summary


def _demo_settings(settings: Settings, run_id: str) -> Settings:
    prefix = f"demo-{run_id}"
    topics = settings.topics.model_copy(
        update={
            "input": f"{prefix}.clickstream",
            "fraud_scores": f"{prefix}.fraud-scores",
            "recommendations": f"{prefix}.recommendations",
            "dead_letter": f"{prefix}.dlq",
            "labels": f"{prefix}.labels",
        }
    )
    consumer = settings.consumer.model_copy(update={"group_id": f"streamscore-{prefix}"})
    return settings.model_copy(update={"topics": topics, "consumer": consumer})


def ensure_models(settings: Settings, console: Console) -> None:
    """Train the models once when the model directory has none for these features."""
    model_dir = settings.engine.model_dir
    if not needs_training(model_dir):
        return
    console.print(f"training models into {model_dir} (first run only)")
    results = train_all(
        model_dir,
        TrainConfig(),
        lambda name, epoch, total: console.print(f"  {name}: epoch {epoch}/{total}"),
    )
    console.print(
        json.dumps(
            {m: {k: v for k, v in r.items() if k != "baselines"} for m, r in results.items()}
        )
    )


def _start_pipeline(settings: Settings, stats_file: Path) -> subprocess.Popen[bytes]:
    env = os.environ | settings_env(settings) | {"STREAMSCORE_LOG_FORMAT": "json"}
    log = (DEMO_DIR / "pipeline.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--stats-file", str(stats_file)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait_until_joined(
    settings: Settings, pipeline: subprocess.Popen[bytes], timeout_s: float
) -> None:
    """Wait until the pipeline owns partitions, so production does not race its start-up."""
    admin = admin_client(settings)
    group = settings.consumer.group_id
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_running(pipeline)
        try:
            description = admin.describe_consumer_groups([group])[group].result()
        except KafkaException:  # the group coordinator may still be loading
            description = None
        if description and any(m.assignment.topic_partitions for m in description.members):
            return
        time.sleep(0.3)
    raise TimeoutError(f"pipeline did not join group {group} in {timeout_s:.0f}s")


def _check_running(pipeline: subprocess.Popen[bytes]) -> None:
    if pipeline.poll() is not None:
        raise RuntimeError(
            f"pipeline exited early with {pipeline.returncode}; see {DEMO_DIR}/pipeline.log"
        )


def _wait_until_consumed(
    settings: Settings, pipeline: subprocess.Popen[bytes], timeout_s: float
) -> None:
    consumer = Consumer(settings.kafka.client_config() | {"group.id": settings.consumer.group_id})
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _check_running(pipeline)
            ends = end_offsets(consumer, settings.topics.input)
            if committed_offsets(consumer, settings.topics.input, ends) == ends:
                return
            time.sleep(0.5)
        raise TimeoutError(f"pipeline did not consume everything in {timeout_s:.0f}s")
    finally:
        consumer.close()


def _stop(pipeline: subprocess.Popen[bytes]) -> None:
    if pipeline.poll() is None:
        pipeline.send_signal(signal.SIGTERM)
    code = pipeline.wait(timeout=60)
    if code != 0:
        raise RuntimeError(f"pipeline exited with {code}; see {DEMO_DIR}/pipeline.log")


def read_topic(
    settings: Settings, topic: str, schema_name: str, timeout_s: float = 60
) -> list[tuple[dict[str, Any], int]]:
    """Every committed record of `topic`, decoded, with its Kafka timestamp (ms): read until
    each partition reports its end, which a transaction's trailing marker cannot delay.
    """
    decoder = Decoder(schema_name)
    consumer = Consumer(
        settings.kafka.client_config()
        | {
            "group.id": f"reader-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        pending = set(topic_partitions(consumer, topic))
        consumer.assign([TopicPartition(topic, p, 0) for p in pending])
        out: list[tuple[dict[str, Any], int]] = []
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{topic}: partitions {sorted(pending)} not read to their end in "
                    f"{timeout_s:.0f}s ({len(out)} records read)"
                )
            for message in consumer.consume(1000, 0.5):
                error = message.error()
                if error is None:
                    out.append((decoder.decode(message.value()), message.timestamp()[1]))
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(message.partition())
                else:
                    raise KafkaException(error)
        return out
    finally:
        consumer.close()


def _summarise(settings: Settings, stats: dict[str, Any], with_candidates: int) -> dict[str, Any]:
    topics = settings.topics
    scores = read_topic(settings, topics.fraud_scores, schemas.FRAUD_SCORE)
    recommendations = read_topic(settings, topics.recommendations, schemas.RECOMMENDATION)
    dead = read_topic(settings, topics.dead_letter, schemas.DEAD_LETTER)
    labels = {
        r["event_id"]: r["is_fraud"]
        for r, _ in read_topic(settings, topics.labels, schemas.FRAUD_LABEL)
    }
    latency = np.array([ts - r["ingest_time"] for r, ts in scores], dtype=np.float64)
    truth = np.array([labels[r["event_id"]] for r, _ in scores], dtype=np.float64)
    probability = np.array([r["score"] for r, _ in scores])
    consumed = int(stats["consumed"])
    return {
        "events_in": consumed,
        "events_with_candidates": with_candidates,
        "fraud_scores": len(scores),
        "recommendations": len(recommendations),
        "dead_lettered": len(dead),
        "dead_letter_reasons": sorted({r["error_kind"] for r, _ in dead}),
        "throughput_eps": round(consumed / max(stats["busy_s"], 1e-9), 1),
        "latency_p50_ms": float(np.percentile(latency, 50)) if len(latency) else None,
        "latency_p99_ms": float(np.percentile(latency, 99)) if len(latency) else None,
        "fraud_pr_auc": metrics.pr_auc(truth, probability) if len(truth) else None,
        "fraud_roc_auc": metrics.roc_auc(truth, probability) if len(truth) else None,
        "topics": topics.model_dump(
            include={"input", "fraud_scores", "recommendations", "dead_letter"}
        ),
    }


def _print(summary: dict[str, Any], console: Console) -> None:
    table = Table(title="streamscore demo")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key != "topics":
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"summary written to {DEMO_DIR / 'summary.json'}")

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
from confluent_kafka import Consumer, KafkaException
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import schemas
from engines import metrics
from pipeline.kafka.admin import admin_client, committed_offsets, end_offsets
from pipeline.kafka.clients import reading_catalog
from pipeline.kafka.messages import read_messages
from pipeline.settings import Settings, settings_env, with_local_key
from pipeline.tools.loadgen import produce_clickstream
from pipeline.topics import create_topics
from pipeline.training.generator import GeneratorConfig
from pipeline.training.train import TrainConfig, needs_training, train_all
from schemas.catalog import subject
from schemas.codec import Decoder
from schemas.registry import RegistryCatalog

DEMO_DIR = Path("var/demo")
MALFORMED_EVERY = 1000


def run_demo(
    settings: Settings, events: int, rate: float, users: int, console: Console
) -> dict[str, Any]:
    """Run the demo and return (and write) its summary."""
    run_id = time.strftime("%Y%m%d-%H%M%S")
    settings = with_local_key(fresh_topics(settings, f"demo-{run_id}"))
    create_topics(settings)
    ensure_models(settings, console)
    pipeline = RunningPipeline(settings, DEMO_DIR)
    try:
        pipeline.wait_until_joined(timeout_s=120)
        config = GeneratorConfig(events=events, users=users, seed=7).anchored_before(time.time())
        with Progress(console=console) as progress:
            task = progress.add_task(f"producing at {rate:.0f}/s", total=events)
            report = produce_clickstream(
                settings, config, rate, MALFORMED_EVERY, lambda n: progress.advance(task, n)
            )
            pipeline.wait_until_consumed(timeout_s=120 + events / 500)
    except BaseException:
        pipeline.kill()
        raise
    stats = pipeline.stop()
    summary = _summarise(settings, stats, report.with_candidates)
    (DEMO_DIR / "summary.json").write_text(json.dumps(summary, indent=2))
    _print(summary, console)
    return summary


def fresh_topics(settings: Settings, prefix: str) -> Settings:
    """`settings` on topics and a group of their own, named under `prefix`."""
    topics = settings.topics.model_copy(
        update={
            "input": f"{prefix}.clickstream",
            "fraud_scores": f"{prefix}.fraud-scores",
            "shadow_scores": f"{prefix}.fraud-scores-shadow",
            "recommendations": f"{prefix}.recommendations",
            "dead_letter": f"{prefix}.dlq",
            "labels": f"{prefix}.labels",
            "forget": f"{prefix}.forget",
            "input_histograms": f"{prefix}.input-histograms",
            "model_quality": f"{prefix}.model-quality",
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


class RunningPipeline:
    """A `streamscore run` child process on `settings`, logging to `directory`/pipeline.log
    and writing its run statistics to `directory`/run-stats.json when it stops.
    """

    def __init__(self, settings: Settings, directory: Path) -> None:
        """Start the process."""
        directory.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.log_path = directory / "pipeline.log"
        self.stats_path = directory / "run-stats.json"
        self.stats_path.unlink(missing_ok=True)
        env = os.environ | settings_env(settings) | {"STREAMSCORE_LOG_FORMAT": "json"}
        command = [sys.executable, "-m", "pipeline.cli", "run"]
        self.process = subprocess.Popen(
            [*command, "--stats-file", str(self.stats_path)],
            env=env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def check_running(self) -> None:
        """Raise when the process has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"pipeline exited early with {self.process.returncode}; see {self.log_path}"
            )

    def wait_until_joined(self, timeout_s: float) -> None:
        """Until the pipeline owns partitions, so production does not race its start-up."""
        admin = admin_client(self.settings.kafka)
        group = self.settings.consumer.group_id
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_running()
            try:
                description = admin.describe_consumer_groups([group])[group].result()
            except KafkaException:  # the group coordinator may still be loading
                description = None
            if description and any(m.assignment.topic_partitions for m in description.members):
                return
            time.sleep(0.3)
        raise TimeoutError(f"pipeline did not join group {group} in {timeout_s:.0f}s")

    def wait_until_consumed(self, timeout_s: float) -> None:
        """Until the group has committed the end of every input partition."""
        settings = self.settings
        group = settings.consumer.group_id
        consumer = Consumer(settings.kafka.client_config() | {"group.id": group})
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                self.check_running()
                ends = end_offsets(consumer, settings.topics.input)
                if committed_offsets(consumer, settings.topics.input, ends) == ends:
                    return
                time.sleep(0.5)
            raise TimeoutError(
                f"group {group} did not commit the end of {settings.topics.input} "
                f"in {timeout_s:.0f}s"
            )
        finally:
            consumer.close()

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait for a clean exit, and return the run statistics it wrote."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        if code != 0:
            raise RuntimeError(f"pipeline exited with {code}; see {self.log_path}")
        stats: dict[str, Any] = json.loads(self.stats_path.read_text())
        return stats

    def kill(self) -> None:
        """End the process at once (after a failure elsewhere)."""
        self.process.kill()
        self.process.wait()


def read_topic(
    settings: Settings, topic: str, schema_name: str, timeout_s: float = 60
) -> list[tuple[dict[str, Any], int]]:
    """Every committed record of `topic`, decoded, with its Kafka timestamp (ms)."""
    decoder = Decoder(schema_name, reading_catalog(settings.schema_registry))
    return [
        (decoder.decode(message.value()), message.timestamp()[1])
        for message in read_messages(settings.kafka, topic, timeout_s)
    ]


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
            include={"input", "fraud_scores", "recommendations", "dead_letter", "labels"}
        ),
        "schema_registry": _registry_summary(settings),
    }


def _registry_summary(settings: Settings) -> dict[str, Any]:
    """The registry's URL and, per subject of the demo's topics, its (version, id) pairs;
    or the static mode's ids.
    """
    catalog = reading_catalog(settings.schema_registry)
    if not isinstance(catalog, RegistryCatalog):
        return catalog.describe()
    topics = settings.topics
    names = {
        subject(topic)
        for topic in (
            topics.input,
            topics.fraud_scores,
            topics.recommendations,
            topics.dead_letter,
            topics.labels,
        )
    }
    found = catalog.subjects()
    return {
        "url": catalog.describe()["url"],
        "subjects": {
            name: [{"version": v, "id": i} for v, i in found[name]]
            for name in sorted(names & found.keys())
        },
    }


def _print(summary: dict[str, Any], console: Console) -> None:
    table = Table(title="streamscore demo")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key == "schema_registry":
            for name, versions in value.get("subjects", {}).items():
                ids = ", ".join(f"v{v['version']}: id {v['id']}" for v in versions)
                table.add_row(f"schema {name}", ids)
        elif key != "topics":
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"summary written to {DEMO_DIR / 'summary.json'}")

"""`streamscore demo --scenario drift`: the feedback loop end to end on fresh topics.

One generated stream, produced in chunks with its labels two chunks late (labels come after
their scores, as chargebacks do): the pipeline scores it, the monitor joins the labels and
reports every second over a short window. Part-way the reseller pattern starts
(`GeneratorConfig.drift_after`), which the served model scores poorly. Then, each step
waiting on the one before:

1. drift: online recall at block falls;
2. alert: the condition of the FraudRecallAtBlockDropped rule (deploy/prometheus/alerts.yml:
   recall under 80% of the version's validation recall, over at least 200 labels) holds
   for three reports in a row;
3. retrain: a challenger is fine-tuned from the champion on the labelled events read back
   from the topics (`pipeline.training.retrain.labelled_events`, since the demo began);
4. shadow: the pipeline's reload watcher finds it and shadow-scores every event with it;
5. promote: the monitor's policy (`monitor.promote`) promotes it once it beats the champion
   on the same labels, and the pipeline serves it from the next batch;
6. recovery: the stream goes on under the new champion.

The recalls in `var/demo/feedback.json` are computed afterwards from the scores actually
served (read back from the fraud-score topic) and the generator's labels, per stretch of
the stream: before the drift, after it under the old model, and after the promotion. The
PNG plots the monitor's online recall and score PSI of the serving version over time, with
the drift, the alert and the promotion marked.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer
from rich.console import Console
from rich.table import Table

import schemas
from engines.registry import CHAMPION, resolve, versions
from pipeline.kafka.clients import connect_catalog, producer_config
from pipeline.monitor.service import Monitor, ensure_monitor_topics
from pipeline.serve.runner import run_pipeline
from pipeline.settings import Settings, with_local_key
from pipeline.tools.demo import DEMO_DIR, ensure_models, fresh_topics, read_topic
from pipeline.topics import create_topics, producer_outputs
from pipeline.training.generator import GeneratorConfig, generate
from pipeline.training.retrain import labelled_events
from pipeline.training.train import TrainConfig, retrain_fraud
from schemas.codec import Encoder

ALERT_RATIO, ALERT_MIN_LABELS, ALERT_REPORTS = 0.8, 200, 3  # the alert rule's, `for` shortened


@dataclass(frozen=True, slots=True)
class DriftPlan:
    """The stream and its pace."""

    events_before: int = 30_000  # before the reseller pattern may start
    chunk: int = 1_500
    chunk_interval_s: float = 0.5
    users: int = 3_000
    reseller_rate: float = 0.3
    seed: int = 21
    window_s: float = 20.0  # the monitor's quality window
    min_labels: int = 1_500  # each side, for the promotion policy
    max_events: int = 600_000
    timeout_s: float = 900.0


@dataclass(slots=True)
class Timeline:
    """What happened when (seconds since the start), and the monitor's figures."""

    started: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)
    marked_at_event: dict[str, int] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    promoted: str | None = None  # the challenger the policy promoted

    def now(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def mark(self, name: str, produced: int, console: Console, what: str) -> None:
        self.marks[name] = self.now()
        self.marked_at_event[name] = produced
        console.print(f"[bold]{self.marks[name]:7.1f} s[/bold]  {name:9} {what}")


def run_drift_demo(settings: Settings, console: Console, plan: DriftPlan) -> dict[str, Any]:
    """Run the scenario; return (and write) var/demo/feedback.json's figures."""
    run_id = time.strftime("%Y%m%d-%H%M%S")
    base = with_local_key(fresh_topics(settings, f"drift-{run_id}"))
    ensure_models(base, console)
    settings = _scenario_settings(base, plan)
    models = settings.engine.model_dir
    shutil.rmtree(models, ignore_errors=True)
    shutil.copytree(base.engine.model_dir, models)  # challengers go to the scenario's copy
    create_topics(settings)
    ensure_monitor_topics(settings)
    champion = versions(models, settings.engine.fraud_model)[-1]
    baseline = _validation_recall(settings, champion)
    console.print(
        f"drift scenario on topics drift-{run_id}.*: champion v{champion}, validation recall "
        f"at block {baseline:.3f}; alert under {ALERT_RATIO:.0%} of it"
    )
    stop = threading.Event()
    monitor = Monitor(settings)
    threads = [
        threading.Thread(target=run_pipeline, args=(settings, stop), name="pipeline"),
        threading.Thread(target=monitor.run, args=(stop,), name="monitor"),
    ]
    for thread in threads:
        thread.start()
    timeline = Timeline()
    try:
        stream = _Stream(settings, plan)
        _drive(settings, plan, stream, monitor, timeline, baseline, console, threads)
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    return _summarise(settings, plan, stream, timeline, baseline, console)


def _scenario_settings(settings: Settings, plan: DriftPlan) -> Settings:
    prefix = settings.topics.input.split(".")[0]
    return settings.model_copy(
        update={
            "engine": settings.engine.model_copy(
                update={"model_dir": DEMO_DIR / "drift-models", "reload_interval_s": 1.0}
            ),
            # Both run in this process: no metrics server (they would share its port).
            "telemetry": settings.telemetry.model_copy(update={"port": 0}),
            "monitor": settings.monitor.model_copy(
                update={
                    "group_id": f"{prefix}-monitor",
                    "quality_window_s": plan.window_s,
                    "report_interval_s": 1.0,
                    "histogram_interval_s": 1.0,
                    "promote": True,
                    "promote_min_labels": plan.min_labels,
                }
            ),
        }
    )


class _Stream:
    """The generated events, produced a chunk at a time, labels two chunks late."""

    def __init__(self, settings: Settings, plan: DriftPlan) -> None:
        config = GeneratorConfig(
            events=plan.max_events,
            users=plan.users,
            seed=plan.seed,
            drift_after=plan.events_before,
            reseller_rate=plan.reseller_rate,
        ).anchored_before(time.time())
        self._events = generate(config)
        self._settings = settings
        catalog = connect_catalog(settings.schema_registry, producer_outputs(settings))
        self._event = Encoder(schemas.CLICK_EVENT, catalog.output_id(schemas.CLICK_EVENT))
        self._label = Encoder(schemas.FRAUD_LABEL, catalog.output_id(schemas.FRAUD_LABEL))
        self._producer = Producer(producer_config(settings.kafka))
        self._late: list[list[dict[str, Any]]] = []
        self.produced = 0
        self.labels: dict[str, dict[str, Any]] = {}  # event_id -> label, with its position
        self.positions: dict[str, int] = {}

    def chunk(self, size: int) -> None:
        """The next `size` events, and the labels of the chunk two before."""
        topics = self._settings.topics
        labels: list[dict[str, Any]] = []
        for event, label in self._events if size else ():
            self._producer.produce(
                topics.input, self._event.encode(event), event["user_id"].encode()
            )
            self.positions[event["event_id"]] = self.produced
            self.labels[event["event_id"]] = label
            labels.append(label)
            self.produced += 1
            if len(labels) == size:
                break
        self._late.append(labels)
        if len(self._late) > 2:
            for label in self._late.pop(0):
                self._producer.produce(
                    topics.labels, self._label.encode(label), label["event_id"].encode()
                )
        self._producer.flush(30)


def _drive(
    settings: Settings,
    plan: DriftPlan,
    stream: _Stream,
    monitor: Monitor,
    timeline: Timeline,
    baseline: float,
    console: Console,
    threads: list[threading.Thread],
) -> None:
    """Produce until the promoted version has served a stretch as long as the drift's."""
    deadline = time.monotonic() + plan.timeout_s
    low_reports = 0
    last_report: object = None

    def step(what: str) -> None:
        nonlocal last_report
        stream.chunk(plan.chunk)
        time.sleep(plan.chunk_interval_s)
        if time.monotonic() > deadline or stream.produced >= plan.max_events:
            raise TimeoutError(f"drift scenario: no {what} after {stream.produced} events")
        for thread in threads:
            if not thread.is_alive():
                raise RuntimeError(f"drift scenario: the {thread.name} stopped (see its log)")
        report = monitor.last_report
        if report is not last_report:
            last_report = report
            timeline.samples.append(_sample(timeline, monitor, stream.produced))

    while stream.produced < plan.events_before:
        step("drift")
    timeline.mark("drift", stream.produced, console, "the reseller pattern starts")
    while low_reports < ALERT_REPORTS:
        reports = len(timeline.samples)
        step("alert")
        if len(timeline.samples) == reports:
            continue  # no new report
        sample = timeline.samples[-1]
        low = (
            sample["labelled"] >= ALERT_MIN_LABELS
            and sample["recall_at_block"] < ALERT_RATIO * baseline
        )
        low_reports = low_reports + 1 if low else 0
    timeline.mark("alert", stream.produced, console, "recall at block under 80% of validation")
    labelled = labelled_events(settings, timeline.now() + 10)  # since the demo began
    path, report = retrain_fraud(
        settings.engine.model_dir,
        labelled.events,
        labelled.labels,
        TrainConfig(),
        lambda *_: None,
        labelled.describe(),
        resolve(settings.engine.model_dir, settings.engine.fraud_model),  # fine-tuned
    )
    timeline.mark(
        "retrain",
        stream.produced,
        console,
        f"challenger v{path.name} on {len(labelled.events):,} labelled events "
        f"(validation PR-AUC {report['pr_auc']:.3f})",
    )
    while not any(v["promoted"] for v in monitor.verdicts):
        step("promotion")
    verdict = next(v for v in monitor.verdicts if v["promoted"])
    timeline.promoted = verdict["challenger"]
    timeline.mark(
        "promotion",
        stream.produced,
        console,
        f"v{verdict['challenger']} over v{verdict['champion']} on {verdict['labelled']} labels: "
        f"recall at block {verdict['challenger_figures'].get('recall_at_block')} vs "
        f"{verdict['champion_figures'].get('recall_at_block')}",
    )
    promoted_at = stream.produced
    drift_len = promoted_at - plan.events_before
    while stream.produced < promoted_at + max(drift_len, 20 * plan.chunk):
        step("end")
    for _ in range(3):  # the last labels out, and reported
        stream.chunk(0)
        time.sleep(1.5)
    timeline.samples.append(_sample(timeline, monitor, stream.produced))
    timeline.mark("end", stream.produced, console, "stream over")


def _sample(timeline: Timeline, monitor: Monitor, produced: int) -> dict[str, Any]:
    """The serving champion's online figures at the monitor's last report."""
    report = monitor.last_report
    champions = [v for v in report if monitor.role(v) == CHAMPION]
    version = max(champions, key=int) if champions else None
    figures = report.get(version, {}) if version else {}
    psi = monitor.last_psi.get(version, {}) if version else {}
    return {
        "t": timeline.now(),
        "produced": produced,
        "version": version,
        "recall_at_block": figures.get("recall_at_block", math.nan),
        "labelled": figures.get("labelled", 0),
        "psi_score": psi.get("score", math.nan),
        "psi_max_feature": max((v for k, v in psi.items() if k != "score"), default=math.nan),
    }


def _validation_recall(settings: Settings, version: str) -> float:
    from pipeline.monitor import quality
    from pipeline.monitor.quality import Tally, at_thresholds

    manifest = resolve(settings.engine.model_dir, settings.engine.fraud_model, version).manifest
    tally = at_thresholds(Tally.from_json(manifest["validation"]), settings.decision)
    return float(quality.figures(tally)["recall_at_block"])


def _summarise(
    settings: Settings,
    plan: DriftPlan,
    stream: _Stream,
    timeline: Timeline,
    baseline: float,
    console: Console,
) -> dict[str, Any]:
    topics = settings.topics
    served = [r for r, _ in read_topic(settings, topics.fraud_scores, schemas.FRAUD_SCORE)]
    shadow = read_topic(settings, topics.shadow_scores, schemas.FRAUD_SCORE)
    block = settings.decision.block_threshold
    promotion = timeline.marked_at_event.get("promotion", math.inf)

    def recall(stretch: Callable[[int, dict[str, Any]], bool]) -> float:
        caught = [
            r["score"] >= block
            for r in served
            if stream.labels[r["event_id"]]["is_fraud"]
            and stretch(stream.positions[r["event_id"]], r)
        ]
        return float(np.mean(caught)) if caught else math.nan

    new_version = timeline.promoted
    summary = {
        "recall_before": recall(lambda at, _: at < plan.events_before),
        "recall_after_drift": recall(lambda at, _: plan.events_before <= at < promotion),
        "recall_after_promotion": recall(lambda _, r: r["model_version"] == new_version),
        "alert_fired": "alert" in timeline.marks,
        "promoted_version": new_version,
        "shadow_scored": len(shadow),
        "validation_recall_at_block": baseline,
        "events": stream.produced,
        "timeline_s": timeline.marks,
        "timeline_events": timeline.marked_at_event,
        "samples": timeline.samples,
        "topics": topics.model_dump(include={"input", "fraud_scores", "shadow_scores", "labels"}),
        "chart": str(DEMO_DIR / "feedback.png"),
    }
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    (DEMO_DIR / "feedback.json").write_text(json.dumps(_finite(summary), indent=2))
    _plot(timeline, baseline, DEMO_DIR / "feedback.png")
    table = Table(title="drift scenario")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in ("recall_before", "recall_after_drift", "recall_after_promotion"):
        table.add_row(key, f"{summary[key]:.3f}")
    for key in ("alert_fired", "promoted_version", "shadow_scored", "events"):
        table.add_row(key, str(summary[key]))
    console.print(table)
    console.print(f"wrote {DEMO_DIR / 'feedback.json'} and {summary['chart']}")
    return summary


def _finite(value: Any) -> Any:
    """JSON without NaN (null instead)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _plot(timeline: Timeline, baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = timeline.samples
    t = [s["t"] for s in samples]
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 6))
    top.plot(t, [s["recall_at_block"] for s in samples], label="online recall at block")
    top.axhline(baseline, color="grey", linestyle=":", label="validation recall")
    top.axhline(ALERT_RATIO * baseline, color="red", linestyle=":", label="alert threshold")
    top.set_ylim(0, 1.05)
    top.set_ylabel("recall at block")
    bottom.plot(t, [s["psi_score"] for s in samples], label="PSI, score")
    bottom.plot(t, [s["psi_max_feature"] for s in samples], label="PSI, largest feature")
    bottom.axhline(0.2, color="red", linestyle=":", label="PSI alert (0.2)")
    bottom.set_ylabel("PSI")
    bottom.set_xlabel("seconds since start")
    colours = {"drift": "orange", "alert": "red", "retrain": "purple", "promotion": "green"}
    for axis in (top, bottom):
        for name, colour in colours.items():
            if name in timeline.marks:
                axis.axvline(timeline.marks[name], color=colour, linestyle="--", label=name)
        axis.legend(loc="lower left", fontsize="small")
    top.set_title("streamscore drift scenario: serving champion's online quality")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

"""`streamscore soak`: the pipeline for a chosen time at a chosen rate on fresh topics, its
lag and memory sampled throughout, then checked.

A live stream (event times from the wall clock, a few events hours late: `[produce]`) is
written at the rate by a thread while a `streamscore run` process scores it. Every
`sample_s` the group's lag and the process's RSS are sampled. When the stream has been
consumed, the run passes when:

- every input is accounted for: the pipeline consumed what was written, and scored or
  dead-lettered each;
- the dead-letter topic holds exactly the malformed messages sent on purpose (none by
  default), each with a decode reason;
- lag stayed bounded: never more than `max_lag_s` seconds of input;
- RSS is flat: over the last two thirds of the run it grew less than `max_rss_growth_mb`.

It prints a table, writes summary.json and soak.png (lag and RSS over time) to its run
folder, and deletes its topics unless asked to keep them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import psutil
from confluent_kafka import KafkaException
from rich.console import Console
from rich.table import Table

import schemas
from pipeline.kafka.admin import TopicNotReady, admin_client, delete_topics
from pipeline.settings import Settings, with_local_key
from pipeline.tools.demo import RunningPipeline, ensure_models, fresh_topics, read_topic
from pipeline.tools.loadgen import ProduceReport, produce_clickstream
from pipeline.topics import create_topics, group_lag, pipeline_topics
from pipeline.training.generator import GeneratorConfig

matplotlib.use("Agg")

SOAK_DIR = Path("var/soak")
PLOT = "soak.png"


@dataclass(frozen=True, slots=True)
class SoakPlan:
    """What to run and what to hold it to."""

    seconds: float = 1800.0
    rate: float = 5000.0
    users: int = 50_000
    seed: int = 5
    malformed_every: int = 0
    sample_s: float = 5.0
    max_lag_s: float = 10.0
    max_rss_growth_mb: float = 50.0
    keep_topics: bool = False

    @property
    def events(self) -> int:
        """Events the stream carries."""
        return int(self.seconds * self.rate)


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the running pipeline."""

    t_s: float  # since production began
    lag: int  # input records not yet committed by the group
    rss_mb: float


@dataclass(slots=True)
class Verdict:
    """The checks, each with the figure it was decided on."""

    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, float | int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every check held."""
        return all(self.checks.values())


def judge(
    plan: SoakPlan,
    samples: list[Sample],
    sent: ProduceReport,
    stats: dict[str, Any],
    dead_reasons: list[str],
) -> Verdict:
    """Decide the run from what was sent, what the pipeline counted and what was sampled."""
    verdict = Verdict()
    written = sent.events + sent.malformed
    lags = [s.lag for s in samples] or [0]
    growth = rss_growth_mb(samples)
    verdict.figures = {
        "events_sent": sent.events,
        "malformed_sent": sent.malformed,
        "consumed": int(stats["consumed"]),
        "scored": int(stats["scored"]),
        "dead_lettered": int(stats["dead_lettered"]),
        "late": int(stats["late"]),
        "max_lag": max(lags),
        "max_lag_s": round(max(lags) / plan.rate, 2),
        "rss_first_mb": round(samples[0].rss_mb, 1) if samples else 0.0,
        "rss_last_mb": round(samples[-1].rss_mb, 1) if samples else 0.0,
        "rss_growth_last_two_thirds_mb": round(growth, 1),
        "achieved_rate": round(sent.events / max(sent.seconds, 1e-9), 1),
    }
    verdict.checks = {
        "every input accounted for": int(stats["consumed"]) == written
        and int(stats["scored"]) + int(stats["dead_lettered"]) == written,
        "dead letters are the malformed sent": len(dead_reasons) == sent.malformed
        and int(stats["dead_lettered"]) == sent.malformed
        and all(reason.startswith("decode.") for reason in dead_reasons),
        f"lag under {plan.max_lag_s:g} s of input": max(lags) <= plan.max_lag_s * plan.rate,
        f"RSS grew under {plan.max_rss_growth_mb:g} MB": growth < plan.max_rss_growth_mb,
    }
    return verdict


def rss_growth_mb(samples: list[Sample]) -> float:
    """RSS growth over the last two thirds of the run, from a least-squares line (a single
    sample's noise does not decide it); the first third is warm-up: caches and state fill.
    """
    tail = samples[len(samples) // 3 :]
    if len(tail) < 2:
        return 0.0
    t = np.array([s.t_s for s in tail])
    rss = np.array([s.rss_mb for s in tail])
    slope = float(np.polyfit(t, rss, 1)[0])
    return slope * float(t[-1] - t[0])


def run_soak(
    settings: Settings, plan: SoakPlan, console: Console, out_dir: Path = SOAK_DIR
) -> dict[str, Any]:
    """Run `plan` on fresh topics, write the summary and the plot; return the summary."""
    run_id = time.strftime("%Y%m%d-%H%M%S")
    settings = with_local_key(fresh_topics(settings, f"soak-{run_id}"))
    run_dir = out_dir / run_id
    create_topics(settings)
    ensure_models(settings, console)
    pipeline = RunningPipeline(settings, run_dir)
    try:
        pipeline.wait_until_joined(timeout_s=180)
        console.print(
            f"soak {run_id}: {plan.events:,} events at {plan.rate:,.0f}/s "
            f"({plan.seconds / 60:.1f} min), {plan.users:,} users"
        )
        sent, samples = _produce_and_sample(settings, plan, pipeline, console.print)
        pipeline.wait_until_consumed(timeout_s=300)
        samples.append(_sample(settings, pipeline, samples[-1].t_s if samples else 0.0))
    except BaseException:
        pipeline.kill()
        raise
    stats = pipeline.stop()
    dead_letters = read_topic(settings, settings.topics.dead_letter, schemas.DEAD_LETTER)
    dead = [record["error_kind"] for record, _ in dead_letters]
    verdict = judge(plan, samples, sent, stats, dead)
    summary = {
        "run": run_id,
        "plan": asdict(plan),
        "passed": verdict.passed,
        "checks": verdict.checks,
        "figures": verdict.figures,
        "dead_letter_reasons": sorted(set(dead)),
        "samples": [asdict(s) for s in samples],
        "topics": settings.topics.model_dump(include={"input", "fraud_scores", "dead_letter"}),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(plan, samples, run_dir / PLOT)
    _print(summary, console, run_dir)
    if not plan.keep_topics:
        _drop(settings)
    return summary


def _produce_and_sample(
    settings: Settings,
    plan: SoakPlan,
    pipeline: RunningPipeline,
    say: Callable[[str], None],
) -> tuple[ProduceReport, list[Sample]]:
    """Write the stream on a thread; sample until it is written."""
    config = GeneratorConfig(events=plan.events, users=plan.users, seed=plan.seed)
    config = config.anchored_before(time.time())
    result: list[ProduceReport] = []
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            result.append(
                produce_clickstream(settings, config, plan.rate, plan.malformed_every, live=True)
            )
        except BaseException as exc:  # handed to the sampling thread, which raises it
            failure.append(exc)

    producer = threading.Thread(target=produce, name="soak-producer", daemon=True)
    started = time.monotonic()
    producer.start()
    samples: list[Sample] = []
    next_say = started + 60
    while producer.is_alive():
        producer.join(plan.sample_s)
        pipeline.check_running()
        try:
            samples.append(_sample(settings, pipeline, time.monotonic() - started))
        except (KafkaException, TopicNotReady) as exc:  # a slow broker costs a sample only
            say(f"  sample skipped: {exc}")
            continue
        if time.monotonic() >= next_say:
            next_say += 60
            last = samples[-1]
            say(f"  {last.t_s / 60:5.1f} min: lag {last.lag:,}, RSS {last.rss_mb:,.0f} MB")
    if failure:
        raise failure[0]
    return result[0], samples


def _sample(settings: Settings, pipeline: RunningPipeline, t_s: float) -> Sample:
    lag = sum(row.lag for row in group_lag(settings))
    rss = psutil.Process(pipeline.process.pid).memory_info().rss / 2**20
    return Sample(round(t_s, 2), lag, round(rss, 1))


def _plot(plan: SoakPlan, samples: list[Sample], path: Path) -> None:
    import matplotlib.pyplot as plt

    t = [s.t_s / 60 for s in samples]
    figure, (lag_axis, rss_axis) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
    lag_axis.plot(t, [s.lag / plan.rate for s in samples])
    lag_axis.axhline(plan.max_lag_s, color="red", linestyle=":", label="bound")
    lag_axis.set_ylabel("lag, s of input")
    lag_axis.legend(loc="upper right")
    rss_axis.plot(t, [s.rss_mb for s in samples])
    rss_axis.set_ylabel("pipeline RSS, MB")
    rss_axis.set_xlabel("minutes")
    figure.suptitle(f"soak at {plan.rate:,.0f} events/s, {plan.users:,} users")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _print(summary: dict[str, Any], console: Console, run_dir: Path) -> None:
    table = Table(title=f"streamscore soak {summary['run']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in summary["figures"].items():
        table.add_row(name, f"{value:,}" if isinstance(value, int) else f"{value:,.2f}")
    for name, held in summary["checks"].items():
        table.add_row(name, "[green]pass[/]" if held else "[red]FAIL[/]")
    console.print(table)
    console.print(f"summary and {PLOT} written to {run_dir}")


def _drop(settings: Settings) -> None:
    """Delete the run's topics (a 30-minute soak writes about 9 million records)."""
    admin = admin_client(settings.kafka)
    existing = set(admin.list_topics(timeout=30).topics)
    group = settings.consumer.group_id
    mine = set(pipeline_topics(settings)) | {name for name in existing if name.startswith(group)}
    delete_topics(admin, sorted(mine & existing))

"""The tools around the pipeline: `produce` (synthetic clickstream), `demo`, `bench`, `plan`
and `soak`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from pipeline.cli.common import (
    ConfigOption,
    app,
    console,
    ensure_kafka,
    ensure_registry,
    require_train,
    settings_from,
)


@app.command()
def produce(
    events: Annotated[int, typer.Option(help="How many events.")] = 100_000,
    rate: Annotated[float, typer.Option(help="Events per second; 0 for as fast as possible.")] = 0,
    users: int = 1000,
    seed: int = 7,
    malformed_every: Annotated[
        int, typer.Option(help="Add a malformed message after every N-th event (0: none).")
    ] = 0,
    config: ConfigOption = None,
) -> None:
    """Write synthetic clickstream to the input topic and its labels to the labels topic.

    With --rate the stream is live: event times come from the wall clock (see [produce]
    settings: a small delay, and a few events hours late). Without, it is a backlog whose
    generated times end before now.
    """
    from pipeline.tools.loadgen import produce_clickstream
    from pipeline.training.generator import GeneratorConfig

    settings = settings_from(config)
    generator = GeneratorConfig(events=events, users=users, seed=seed).anchored_before(time.time())
    with Progress(console=console) as progress:
        task = progress.add_task("producing", total=events)
        report = produce_clickstream(
            settings,
            generator,
            rate or None,
            malformed_every,
            lambda n: progress.advance(task, n),
            live=bool(rate),
        )
    console.print(json.dumps(asdict(report)))


@app.command()
def demo(
    events: int = 100_000,
    rate: Annotated[float, typer.Option(help="Production rate, events per second.")] = 2500,
    users: int = 1000,
    scenario: Annotated[
        str,
        typer.Option(
            help="main: the job end to end; drift: a new fraud pattern part-way, the alert, "
            "retrain, shadow, promotion and recovery (var/demo/feedback.json and .png)."
        ),
    ] = "main",
    config: ConfigOption = None,
) -> None:
    """End to end on the local broker: train if needed, produce, score, summarise."""
    require_train("streamscore demo")
    settings = settings_from(config)
    ensure_kafka(settings)
    with console.status("starting the schema registry"):
        ensure_registry(settings)
    if scenario == "drift":
        from pipeline.tools.drift_demo import DriftPlan, run_drift_demo

        run_drift_demo(settings, console, DriftPlan())
        return
    if scenario != "main":
        raise typer.BadParameter(f"--scenario {scenario!r}: main or drift")
    from pipeline.tools.demo import run_demo

    run_demo(settings, events=events, rate=rate, users=users, console=console)


@app.command()
def bench(
    smoke: Annotated[
        bool, typer.Option(help="A tiny run of every phase (what `make test` runs).")
    ] = False,
    events: Annotated[int | None, typer.Option(help="Backlog events (throughput).")] = None,
    configs: Annotated[
        str | None, typer.Option(help="Comma-separated configurations; default all.")
    ] = None,
    rss_users: Annotated[
        int | None, typer.Option(help="Distinct users for the memory phase.")
    ] = None,
    extras: Annotated[
        bool, typer.Option(help="Also the batch/wait sweep, the profile and the memory phase.")
    ] = True,
    out: Annotated[Path, typer.Option(help="Runs go to OUT/<run>/.")] = Path("var/bench"),
    publish: Annotated[
        Path | None, typer.Option(help="Also copy the report files here (e.g. docs/bench).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Streamscore against the Kafka ceiling, a naive loop and Quix Streams, on the local
    broker: throughput, latency at 25/50/75% of max, CPU and RSS.
    """
    require_train("streamscore bench")
    from dataclasses import replace

    from pipeline.tools.bench.report import publish as publish_report
    from pipeline.tools.bench.report import run_bench, table
    from pipeline.tools.bench.workload import BY_NAME, Plan
    from pipeline.tools.demo import ensure_models

    settings = settings_from(config)
    ensure_kafka(settings)
    plan = Plan.smoke() if smoke else Plan()
    if events is not None:
        plan = replace(plan, events=events)
    if rss_users is not None:
        plan = replace(plan, rss_users=rss_users)
    plan = replace(plan, extras=extras)
    if configs is not None:
        names = tuple(name.strip() for name in configs.split(",") if name.strip())
        unknown = [name for name in names if name not in BY_NAME]
        if unknown:
            console.print(f"[red]unknown configurations {unknown}; have {list(BY_NAME)}[/red]")
            raise typer.Exit(2)
        plan = replace(plan, configs=names)
    ensure_models(settings, console)
    results = run_bench(settings, plan, out, console.print)
    run_dir = out / results["run"]
    console.print(table(results))
    for row in results["targets"]:
        bound = row.get("ceiling_at_same_rate")
        beside = "" if bound is None else f"; the ceiling at the same rate: {bound}"
        console.print(
            f"{row['target']}: {row['measured']} (goal {row['goal']}, met {row['met']}{beside})"
        )
    console.print(f"written to {run_dir}")
    if publish is not None:
        for path in publish_report(run_dir, publish):
            console.print(f"published {path}")


@app.command()
def plan(
    target_eps: Annotated[float, typer.Option(help="Events per second to sustain.")],
    latency_slo_ms: Annotated[float, typer.Option(help="p99 end-to-end latency to hold.")],
    guarantee: Annotated[str, typer.Option(help="at_least_once or exactly_once.")] = (
        "at_least_once"
    ),
    results: Annotated[
        Path | None,
        typer.Option(
            help="A bench results.json; default the newest under var/bench, then "
            "the published docs/bench/results.json."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object only.")] = False,
) -> None:
    """Partitions, replicas, batch size, max wait and KEDA lagThreshold for a target rate and
    latency SLO, from the latest bench results, with the arithmetic.
    """
    from pipeline.tools.bench.plan import PlanError, recommend
    from pipeline.tools.bench.report import latest

    source = results or latest(Path("var/bench")) or Path("docs/bench/results.json")
    if not source.is_file():
        console.print(f"[red]no bench results at {source}; run `streamscore bench`[/red]")
        raise typer.Exit(2)
    if guarantee not in ("at_least_once", "exactly_once"):
        console.print("[red]--guarantee must be at_least_once or exactly_once[/red]")
        raise typer.Exit(2)
    try:
        advice = recommend(
            json.loads(source.read_text()),
            target_eps,
            latency_slo_ms,
            guarantee,  # type: ignore[arg-type]
        )
    except PlanError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    if as_json:
        print(json.dumps(advice.as_dict() | {"results": str(source)}, indent=2))
        return
    from rich.table import Table

    out = Console()
    table = Table(title=f"plan for {target_eps:,.0f} events/s at p99 ≤ {latency_slo_ms:g} ms")
    table.add_column("setting")
    table.add_column("value", justify="right")
    for key in (
        "replicas",
        "partitions",
        "max_replicas",
        "max_batch",
        "max_wait_ms",
        "lag_threshold",
        "per_pod_eps",
        "slo_met_in_bench",
    ):
        table.add_row(key, str(getattr(advice, key)))
    out.print(table)
    out.print(f"from {source}")
    for line in advice.reasoning:
        out.print(f"- {line}")


@app.command()
def soak(
    minutes: Annotated[float, typer.Option(help="How long the stream runs.")] = 30.0,
    rate: Annotated[float, typer.Option(help="Events per second.")] = 5000.0,
    users: int = 50_000,
    seed: int = 5,
    malformed_every: Annotated[
        int, typer.Option(help="Send a malformed message after every N-th event (0: none).")
    ] = 0,
    max_lag_s: Annotated[float, typer.Option(help="Lag bound, seconds of input.")] = 10.0,
    max_rss_growth_mb: Annotated[
        float, typer.Option(help="RSS growth allowed over the last two thirds.")
    ] = 50.0,
    keep_topics: Annotated[bool, typer.Option(help="Leave the run's topics behind.")] = False,
    config: ConfigOption = None,
) -> None:
    """A live stream at a fixed rate on fresh topics for a while; lag and RSS sampled, then
    checked: inputs accounted for, dead letters as sent, lag bounded, RSS flat.
    """
    require_train("streamscore soak")
    from pipeline.tools.soak import SoakPlan, run_soak

    settings = settings_from(config)
    ensure_kafka(settings)
    ensure_registry(settings)
    plan = SoakPlan(
        seconds=minutes * 60,
        rate=rate,
        users=users,
        seed=seed,
        malformed_every=malformed_every,
        max_lag_s=max_lag_s,
        max_rss_growth_mb=max_rss_growth_mb,
        keep_topics=keep_topics,
    )
    summary = run_soak(settings, plan, console)
    if not summary["passed"]:
        raise typer.Exit(1)


@app.command()
def chaos(
    seed: Annotated[int, typer.Option(help="Draws the faults' targets and times; printed.")] = 1,
    runs: Annotated[int, typer.Option(help="Seeded runs in a row: seed, seed+1, ...")] = 1,
    events: int = 180_000,
    rate: Annotated[float, typer.Option(help="Events per second.")] = 1500.0,
    users: int = 20_000,
    instances: Annotated[int, typer.Option(help="Pipeline processes.")] = 3,
    guarantee: Annotated[str, typer.Option(help="exactly_once or at_least_once.")] = "exactly_once",
    schedule: Annotated[
        str,
        typer.Option(
            help="random: faults of every kind drawn over the run; issue48: the fixed schedule "
            "that found issue #48."
        ),
    ] = "random",
    static_membership: Annotated[
        bool,
        typer.Option(
            help="Each instance a static member (consumer.instance_id), as deploy/k8s runs them."
        ),
    ] = True,
    catch_up_s: Annotated[
        float, typer.Option(help="After the last repair, the bound to score everything.")
    ] = 60.0,
    config: ConfigOption = None,
) -> None:
    """Pipeline instances on a fresh local 3-node cluster under a seeded schedule of broker
    and instance faults; every event must be scored (exactly once, with the features of a
    fault-free replay, under exactly_once). Writes var/chaos/<run>/summary.json and
    timeline.png.
    """
    require_train("streamscore chaos")
    from pipeline.tools.chaos import ChaosPlan, run_chaos

    if guarantee not in ("exactly_once", "at_least_once"):
        console.print(f"[red]--guarantee: {guarantee!r} is not exactly_once or at_least_once[/]")
        raise typer.Exit(2)
    if schedule not in ("random", "issue48"):
        console.print(f"[red]--schedule: {schedule!r} is not random or issue48[/]")
        raise typer.Exit(2)
    settings = settings_from(config)
    failed = []
    for run_seed in range(seed, seed + runs):
        plan = ChaosPlan(
            events=events,
            rate=rate,
            users=users,
            instances=instances,
            guarantee=guarantee,  # type: ignore[arg-type]
            seed=run_seed,
            schedule=schedule,  # type: ignore[arg-type]
            static_membership=static_membership,
            catch_up_s=catch_up_s,
        )
        summary = run_chaos(settings, plan, console)
        if not summary["passed"]:
            failed.append(run_seed)
    console.print(f"chaos: {runs - len(failed)} of {runs} runs passed; failed seeds: {failed}")
    if failed:
        raise typer.Exit(1)

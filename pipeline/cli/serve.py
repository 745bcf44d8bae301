"""The production commands: `run` (the pipeline), `warm`, `monitor`, `forget` and `lag`."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipeline.cli.common import ConfigOption, app, console, log, require_train, settings_from
from pipeline.settings import SettingsError


@app.command()
def run(
    config: ConfigOption = None,
    stats_file: Annotated[Path | None, typer.Option(help="Write run counts here on exit.")] = None,
    profile: Annotated[
        Path | None, typer.Option(help="Profile with pyinstrument; write its text report here.")
    ] = None,
) -> None:
    """Run the pipeline until SIGTERM or SIGINT, then finish the batch, flush, commit and exit.

    Exit code 3: exactly-once could not go on (no transactional producer could be
    initialised within processing.transaction_call_timeout_ms); nothing uncommitted is
    lost, and a supervisor's restart resumes from the last commit.
    """
    from pipeline.serve.commit import TransactionsFailed
    from pipeline.serve.runner import run_pipeline

    settings = settings_from(config)
    try:
        settings.privacy.secret()
    except SettingsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if profile is None:
        try:
            run_pipeline(settings, stop, stats_file)
        except TransactionsFailed as exc:
            log.error("pipeline_exited", reason=str(exc), exit_code=3)
            console.print(f"streamscore run: {exc}", style="red", markup=False)
            raise typer.Exit(3) from exc
        return
    require_train("streamscore run --profile")
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001)
    with profiler:
        run_pipeline(settings, stop, stats_file)
    profile.parent.mkdir(parents=True, exist_ok=True)
    profile.write_text(profiler.output_text(unicode=True, color=False, show_all=False))


@app.command()
def warm() -> None:
    """Compile the hot path's kernels into numba's cache (the Dockerfiles run this)."""
    from pipeline.serve.runner import warm_kernels

    typer.echo(f"kernels ready in {warm_kernels():.1f} s")


@app.command()
def monitor(config: ConfigOption = None) -> None:
    """Join delayed fraud labels to the scores served; report quality per model version
    (Prometheus on telemetry.port) until SIGTERM or SIGINT.
    """
    from pipeline.monitor.service import Monitor

    settings = settings_from(config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    Monitor(settings).run(stop)


@app.command()
def forget(
    user_id: Annotated[str, typer.Option("--user-id", help="The user to erase.")],
    config: ConfigOption = None,
) -> None:
    """Ask every pipeline instance to drop a user's state (an erasure request), with a
    changelog tombstone; the owner of the user's partition applies it between batches.
    """
    from pipeline.serve.forget import request_forget

    settings = settings_from(config)
    request = request_forget(settings, user_id)
    console.print(
        f"erasure request at {settings.topics.forget} offset {request.offset}; "
        "instances log forget_applied when they apply it"
    )


@app.command()
def lag(config: ConfigOption = None) -> None:
    """Per-partition lag of the pipeline's consumer group, like kafka-consumer-groups."""
    from rich.table import Table

    from pipeline.topics import group_lag

    settings = settings_from(config)
    rows = group_lag(settings)
    table = Table(title=f"group {settings.consumer.group_id}")
    for column in ("topic", "partition", "committed", "end", "lag", "owner"):
        table.add_column(column, justify="right" if column in ("partition", "lag") else "left")
    for row in rows:
        table.add_row(
            row.topic,
            str(row.partition),
            "-" if row.committed is None else str(row.committed),
            str(row.end),
            str(row.lag),
            row.owner or "-",
        )
    Console().print(table)
    console.print(f"total lag {sum(row.lag for row in rows):,}")

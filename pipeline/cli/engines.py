"""`streamscore engines`: build the inference engines for this machine, benchmark them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from pipeline.cli.common import ConfigOption, console, settings_from

group = typer.Typer(help="Inference engines: build them for this machine, benchmark them.")


@group.command("build")
def engines_build(
    refresh: Annotated[
        bool, typer.Option(help="Rebuild TensorRT plans even when the cache holds them.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Build (TensorRT) or load and check (ONNX Runtime, torch) the pinned models' engines."""
    from rich.table import Table

    from engines.base import EngineError
    from engines.build import build_engines

    settings = settings_from(config)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("building engines", total=len(settings.engine.pins()))

        def step(done: int, description: str) -> None:
            progress.update(task, description=description, completed=done)

        try:
            results = build_engines(settings.engine, refresh=refresh, step=step)
        except EngineError as exc:
            console.print(f"[red]engine build failed: {exc}[/red]")
            raise typer.Exit(1) from exc
    table = Table(title="engines build")
    for column in ("model", "version", "backend", "precision", "max batch", "artefact", "s"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(
            r.model,
            r.version,
            r.backend,
            r.precision,
            str(r.max_batch),
            r.artefact,
            f"{r.seconds:.2f}",
        )
    Console().print(table)


@group.command("bench")
def engines_bench(
    backends: Annotated[
        str, typer.Option(help="Comma-separated: onnxruntime,torch.")
    ] = "onnxruntime,torch",
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,64,256,1024",
    config: ConfigOption = None,
) -> None:
    """Print latency and throughput per model, backend and batch size (one intra-op thread)."""
    from rich.table import Table

    from engines.bench import bench_engine
    from engines.factory import load_engine
    from engines.registry import resolve
    from engines.settings import Backend

    settings = settings_from(config)
    table = Table(title=f"engines bench ({settings.engine.threads} thread)")
    for column in ("model", "backend", "device", "batch", "µs/batch", "µs/event", "events/s"):
        text = column in ("model", "backend", "device")
        table.add_column(column, justify="left" if text else "right")
    sizes = tuple(int(size) for size in batches.split(","))
    for backend in backends.split(","):
        engine_settings = settings.engine.model_copy(update={"backend": Backend(backend)})
        for pin in engine_settings.pins():
            pin = pin.model_copy(update={"max_batch": max(sizes)})
            engine = load_engine(pin, engine_settings)
            try:
                artifact = resolve(settings.engine.model_dir, pin.name, engine.version)
                for row in bench_engine(artifact, engine, sizes):
                    table.add_row(
                        row.model,
                        row.backend,
                        row.device,
                        str(row.batch),
                        f"{row.us_per_batch:.1f}",
                        f"{row.us_per_event:.2f}",
                        f"{row.events_per_s:,.0f}",
                    )
            finally:
                engine.close()
    Console().print(table)

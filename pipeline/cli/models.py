"""The model commands: `train`, `retrain` from labels, `promote` and `evaluate` (torch: the
`train` extra, except `promote`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, TaskID

from pipeline.cli.common import (
    ConfigOption,
    app,
    console,
    log,
    print_metrics,
    require_train,
    settings_from,
)


@app.command()
def train(
    events: int = 200_000,
    users: int = 2000,
    seed: int = 7,
    max_epochs: int = 12,
    model_dir: Annotated[Path | None, typer.Option(help="Defaults to engine.model_dir.")] = None,
    if_missing: Annotated[bool, typer.Option(help="Do nothing when both models exist.")] = False,
    config: ConfigOption = None,
) -> None:
    """Train the fraud and ranking models on generated data and save new versions."""
    require_train("streamscore train")
    from pipeline.training.train import TrainConfig, needs_training, train_all

    settings = settings_from(config)
    directory = model_dir or settings.engine.model_dir
    if if_missing and not needs_training(directory):
        console.print(f"models for these features exist under {directory}; skipping training")
        return
    train_config = TrainConfig(events=events, users=users, seed=seed, max_epochs=max_epochs)
    with Progress(console=console) as progress:
        tasks: dict[str, TaskID] = {}

        def report(name: str, epoch: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(f"training {name}", total=total)
            progress.update(tasks[name], completed=epoch)

        results = train_all(directory, train_config, report)
    print_metrics(results)


@app.command()
def retrain(
    window_h: Annotated[
        float, typer.Option(help="Train on the labelled events of this many last hours.")
    ] = 24.0,
    min_events: Annotated[
        int, typer.Option(help="Refuse to train on fewer labelled events.")
    ] = 1000,
    max_epochs: int = 12,
    fine_tune: Annotated[
        bool,
        typer.Option(
            help="Start from the champion's weights (it keeps what it knows of patterns the "
            "window lacks); --no-fine-tune trains from scratch."
        ),
    ] = True,
    config: ConfigOption = None,
) -> None:
    """Train a fraud challenger on recent labelled events read from the input and labels
    topics; it is saved as the next version in the challenger role (shadow-scored, never
    serving until promoted).
    """
    require_train("streamscore retrain")
    from engines.registry import resolve
    from pipeline.training.retrain import labelled_events
    from pipeline.training.train import TrainConfig, retrain_fraud

    settings = settings_from(config)
    labelled = labelled_events(settings, window_h * 3600)
    if len(labelled.events) < min_events or not labelled.labels.any():
        console.print(
            f"[red]{len(labelled.events)} labelled events ({int(labelled.labels.sum())} "
            f"fraud) in the last {window_h:g} h: fewer than --min-events {min_events}, or no "
            "fraud to learn from; nothing trained[/red]"
        )
        raise typer.Exit(1)
    train_config = TrainConfig(max_epochs=max_epochs)
    path, report = retrain_fraud(
        settings.engine.model_dir,
        labelled.events,
        labelled.labels,
        train_config,
        lambda *_: None,
        labelled.describe(),
        resolve(settings.engine.model_dir, settings.engine.fraud_model) if fine_tune else None,
    )
    log.info("challenger_trained", version=path.name, **labelled.describe(), **report)
    console.print(f"challenger fraud version {path.name} under {path.parent}")
    print_metrics({"fraud": dict(report)})


@app.command()
def promote(
    version: Annotated[str, typer.Option(help="The challenger version to promote.")],
    reason: Annotated[str, typer.Option(help="Why, kept in its manifest.")] = "by hand",
    config: ConfigOption = None,
) -> None:
    """Make a fraud challenger the champion: processes serving `latest` load it live."""
    from engines.base import EngineError
    from engines.registry import promote as promote_version

    settings = settings_from(config)
    record = {"at_ms": int(time.time() * 1000), "reason": reason}
    try:
        artifact = promote_version(settings.engine.model_dir, "fraud", version, record)
    except EngineError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    log.info("model_promoted", model="fraud", version=artifact.version, **record)
    console.print(f"fraud version {artifact.version} is the champion")


@app.command()
def evaluate(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object only.")] = False,
    out_dir: Annotated[Path, typer.Option(help="Where the PNG plots go.")] = Path("var/evaluate"),
    events: int = 60_000,
    users: int = 600,
    config: ConfigOption = None,
) -> None:
    """Fraud and ranking quality on held-out generated data, with baselines and plots."""
    require_train("streamscore evaluate")
    from pipeline.training.evaluate import evaluate as run_evaluation

    settings = settings_from(config)
    engine = settings.engine
    report = run_evaluation(
        engine.model_dir, out_dir, engine.fraud_version, engine.ranking_version, events, users
    )
    if as_json:
        typer.echo(json.dumps(report))
        return
    print_metrics({"fraud": report["fraud"], "ranking": report["ranking"]})
    console.print(f"held out: {report['held_out']}; plots in {out_dir}")

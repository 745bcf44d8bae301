"""The `streamscore` command line."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import asdict
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import Progress, TaskID

from pipeline.kafka.broker import LocalBroker
from pipeline.kafka.registry import LocalRegistry
from pipeline.logging import configure_logging, get_logger
from pipeline.settings import DEFAULT_REGISTRY_URL, Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from schemas.registry import RegistryCatalog

app = typer.Typer(help="Streaming fraud scoring and item ranking on Kafka.", no_args_is_help=True)
kafka_app = typer.Typer(help="The local Apache Kafka broker (KRaft, from Maven Central).")
topics_app = typer.Typer(help="Topics of the pipeline.")
app.add_typer(kafka_app, name="kafka")
app.add_typer(topics_app, name="topics")
state_app = typer.Typer(help="Per-user feature state: its size and restore speed.")
app.add_typer(state_app, name="state")
engines_app = typer.Typer(help="Inference engines: build them for this machine, benchmark them.")
app.add_typer(engines_app, name="engines")
registry_app = typer.Typer(help="The local schema registry (Apicurio 3, from Maven Central).")
app.add_typer(registry_app, name="registry")
schemas_app = typer.Typer(help="Schemas in the registry: register, check, list.")
app.add_typer(schemas_app, name="schemas")
console = Console(stderr=True)
log = get_logger()

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file.", envvar="STREAMSCORE_CONFIG"),
]
KAFKA_HOME = Path("var/kafka")
REGISTRY_HOME = Path("var/registry")


def _require_train(command: str) -> None:
    """Stop with how to install the `train` extra when `command` needs it and it is missing:
    the default install serves without torch.
    """
    missing = [
        name for name in ("torch", "onnx", "matplotlib", "psutil") if find_spec(name) is None
    ]
    if missing:
        console.print(
            f"{command} needs the train extra ({', '.join(missing)} missing): "
            "pip install 'streamscore[train]'",
            style="red",
            markup=False,
        )
        raise typer.Exit(2)


def _settings(config: Path | None) -> Settings:
    try:
        settings = load_settings(config)
    except SettingsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    configure_logging(settings.log_format)
    return settings


def _broker(port: int) -> LocalBroker:
    return LocalBroker(KAFKA_HOME, KAFKA_HOME / "libs", port=port, controller_port=port + 1)


def ensure_kafka(settings: Settings, port: int = 9092) -> str:
    """The bootstrap of KAFKA_BOOTSTRAP_SERVERS, or of the local broker, started if needed."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return settings.kafka.bootstrap_servers
    return _broker(port).up()


@kafka_app.command("up")
def kafka_up(
    port: Annotated[int, typer.Option(help="PLAINTEXT port; controller uses port+1.")] = 9092,
) -> None:
    """Fetch the broker jars if needed, format storage once, start, and wait until it answers."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        console.print(
            f"KAFKA_BOOTSTRAP_SERVERS is set; using {os.environ['KAFKA_BOOTSTRAP_SERVERS']}"
        )
        return
    with console.status("starting Kafka"):
        bootstrap = _broker(port).up()
    console.print(f"Kafka is up at {bootstrap}")


@kafka_app.command("down")
def kafka_down(
    port: int = 9092, purge: Annotated[bool, typer.Option(help="Also delete its data.")] = False
) -> None:
    """Stop the local broker."""
    _broker(port).down(purge=purge)
    console.print("Kafka is down" + (" and its data deleted" if purge else ""))


@kafka_app.command("status")
def kafka_status(port: int = 9092) -> None:
    """Say whether the local broker runs and answers."""
    broker = _broker(port)
    pid = broker.pid()
    answering = pid is not None and broker.ready(timeout_s=5)
    console.print(f"pid={pid} bootstrap={broker.bootstrap} answering={answering}")
    if not answering:
        raise typer.Exit(1)


def _registry(settings: Settings, port: int = 8081) -> LocalRegistry:
    return LocalRegistry(
        REGISTRY_HOME,
        REGISTRY_HOME / "app",
        settings.kafka.bootstrap_servers,
        port=port,
        management_port=port + 10,
    )


def ensure_registry(settings: Settings) -> str | None:
    """Start the local registry when the settings name it (the default URL) and
    SCHEMA_REGISTRY_URL does not name another; the URL in use, or None in the static mode.
    """
    url = settings.schema_registry.url
    if not url:
        return None
    if url == DEFAULT_REGISTRY_URL and not os.environ.get("SCHEMA_REGISTRY_URL"):
        return _registry(settings).up()
    return url


@registry_app.command("up")
def registry_up(
    port: Annotated[int, typer.Option(help="HTTP port; health checks on port+10.")] = 8081,
    config: ConfigOption = None,
) -> None:
    """Fetch Apicurio if needed, start it on the local broker (KafkaSQL storage), wait
    until ready.
    """
    settings = _settings(config)
    ensure_kafka(settings)
    with console.status("starting the schema registry"):
        url = _registry(settings, port).up()
    console.print(f"schema registry is up at {url}")


@registry_app.command("down")
def registry_down(port: int = 8081, config: ConfigOption = None) -> None:
    """Stop the local registry; its schemas stay in its journal topic on the broker."""
    _registry(_settings(config), port).down()
    console.print("schema registry is down")


@registry_app.command("status")
def registry_status(port: int = 8081, config: ConfigOption = None) -> None:
    """Say whether the local registry runs and answers."""
    registry = _registry(_settings(config), port)
    pid = registry.pid()
    answering = pid is not None and registry.ready(timeout_s=5)
    console.print(f"pid={pid} url={registry.url} answering={answering}")
    if not answering:
        raise typer.Exit(1)


def _registry_catalog(settings: Settings) -> RegistryCatalog:
    from schemas.registry import RegistryCatalog

    registry = settings.schema_registry
    if not registry.enabled:
        console.print("[red]schema_registry.url is empty: the static catalog has no registry[/red]")
        raise typer.Exit(2)
    return RegistryCatalog(registry.client_config(), {}, registry.compatibility)


@schemas_app.command("register")
def schemas_register(config: ConfigOption = None) -> None:
    """Register every topic's schema (.avsc) under its `<topic>-value` subject, with the
    configured compatibility; a refused schema fails with the subject named.
    """
    from pipeline.kafka.clients import monitor_outputs, pipeline_outputs, producer_outputs
    from schemas.catalog import IncompatibleSchema, subject

    settings = _settings(config)
    catalog = _registry_catalog(settings)
    outputs = producer_outputs(settings) | pipeline_outputs(settings) | monitor_outputs(settings)
    for topic, name in outputs.items():
        try:
            schema_id = catalog.register(name, subject(topic))
        except IncompatibleSchema as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
        console.print(f"{subject(topic)}: {name} id {schema_id}")


@schemas_app.command("check")
def schemas_check(
    schema_file: Annotated[Path, typer.Argument(help="A candidate .avsc file.")],
    topic: Annotated[str | None, typer.Option(help="Its topic; default: the input.")] = None,
    config: ConfigOption = None,
) -> None:
    """Exit 0 when SCHEMA_FILE may be registered under the topic's subject by its
    compatibility rule, 1 when the registry would refuse it.
    """
    from schemas.catalog import subject

    settings = _settings(config)
    catalog = _registry_catalog(settings)
    name = subject(topic or settings.topics.input)
    candidate = json.loads(schema_file.read_text())
    if catalog.check(name, candidate):
        console.print(f"{schema_file} is compatible with {name}")
        return
    console.print(f"[red]{schema_file} is not compatible with {name}[/red]")
    raise typer.Exit(1)


@schemas_app.command("list")
def schemas_list(config: ConfigOption = None) -> None:
    """Every subject in the registry with its versions and their ids."""
    from rich.table import Table

    catalog = _registry_catalog(_settings(config))
    table = Table(title=f"subjects at {catalog.describe()['url']}")
    table.add_column("subject")
    table.add_column("version", justify="right")
    table.add_column("id", justify="right")
    for name, versions in sorted(catalog.subjects().items()):
        for version, schema_id in versions:
            table.add_row(name, str(version), str(schema_id))
    Console().print(table)


@topics_app.command("create")
def topics_create(config: ConfigOption = None) -> None:
    """Create the pipeline's topics where missing, and the compacted state changelog."""
    from pipeline.features.changelog import ensure_changelog
    from pipeline.kafka.admin import create_topics

    settings = _settings(config)
    created = create_topics(settings)
    changelog = ensure_changelog(settings)
    console.print(f"created: {', '.join(created) or 'nothing, all exist'}; changelog {changelog}")


@app.command()
def forget(
    user_id: Annotated[str, typer.Option("--user-id", help="The user to erase.")],
    config: ConfigOption = None,
) -> None:
    """Ask every pipeline instance to drop a user's state (an erasure request), with a
    changelog tombstone; the owner of the user's partition applies it between batches.
    """
    from pipeline.forget import request_forget

    settings = _settings(config)
    request = request_forget(settings, user_id)
    console.print(
        f"erasure request at {settings.topics.forget} offset {request.offset}; "
        "instances log forget_applied when they apply it"
    )


@app.command()
def monitor(config: ConfigOption = None) -> None:
    """Join delayed fraud labels to the scores served; report quality per model version
    (Prometheus on telemetry.port) until SIGTERM or SIGINT.
    """
    from pipeline.monitor.service import Monitor

    settings = _settings(config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    Monitor(settings).run(stop)


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
    from pipeline.generator import GeneratorConfig
    from pipeline.loadgen import produce_clickstream

    settings = _settings(config)
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
    _require_train("streamscore train")
    from pipeline.training.train import TrainConfig, needs_training, train_all

    settings = _settings(config)
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
    _print_metrics(results)


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
    _require_train("streamscore retrain")
    from engines.registry import resolve
    from pipeline.training.retrain import labelled_events
    from pipeline.training.train import TrainConfig, retrain_fraud

    settings = _settings(config)
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
    _print_metrics({"fraud": dict(report)})


@app.command()
def promote(
    version: Annotated[str, typer.Option(help="The challenger version to promote.")],
    reason: Annotated[str, typer.Option(help="Why, kept in its manifest.")] = "by hand",
    config: ConfigOption = None,
) -> None:
    """Make a fraud challenger the champion: processes serving `latest` load it live."""
    from engines.base import EngineError
    from engines.registry import promote as promote_version

    settings = _settings(config)
    record = {"at_ms": int(time.time() * 1000), "reason": reason}
    try:
        artifact = promote_version(settings.engine.model_dir, "fraud", version, record)
    except EngineError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    log.info("model_promoted", model="fraud", version=artifact.version, **record)
    console.print(f"fraud version {artifact.version} is the champion")


def _print_metrics(results: dict[str, dict[str, object]]) -> None:
    from rich.table import Table

    table = Table(title="validation metrics (later 20% of the timeline)")
    table.add_column("model")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for model, values in results.items():
        for name, value in values.items():
            if isinstance(value, float):
                table.add_row(model, name, f"{value:.4f}")
        for baseline, metrics in dict(values.get("baselines", {})).items():  # type: ignore[call-overload]
            for name, value in metrics.items():
                table.add_row(model, f"{baseline} baseline {name}", f"{value:.4f}")
    Console().print(table)


@app.command()
def evaluate(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object only.")] = False,
    out_dir: Annotated[Path, typer.Option(help="Where the PNG plots go.")] = Path("var/evaluate"),
    events: int = 60_000,
    users: int = 600,
    config: ConfigOption = None,
) -> None:
    """Fraud and ranking quality on held-out generated data, with baselines and plots."""
    _require_train("streamscore evaluate")
    from pipeline.training.evaluate import evaluate as run_evaluation

    settings = _settings(config)
    engine = settings.engine
    report = run_evaluation(
        engine.model_dir, out_dir, engine.fraud_version, engine.ranking_version, events, users
    )
    if as_json:
        typer.echo(json.dumps(report))
        return
    _print_metrics({"fraud": report["fraud"], "ranking": report["ranking"]})
    console.print(f"held out: {report['held_out']}; plots in {out_dir}")


@engines_app.command("build")
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

    settings = _settings(config)
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


@engines_app.command("bench")
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

    settings = _settings(config)
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


@app.command()
def lag(config: ConfigOption = None) -> None:
    """Per-partition lag of the pipeline's consumer group, like kafka-consumer-groups."""
    from rich.table import Table

    from pipeline.kafka.admin import group_lag

    settings = _settings(config)
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


@state_app.command("bench")
def state_bench(
    users: Annotated[int, typer.Option(help="Full-history users to measure.")] = 200_000,
    out: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = Path(
        "var/bench/state.json"
    ),
    config: ConfigOption = None,
) -> None:
    """Bytes of state per user and changelog restore rate, on the local broker."""
    from rich.table import Table

    from pipeline.features.bench import run_state_bench

    settings = _settings(config)
    ensure_kafka(settings)
    with console.status(f"measuring {users:,} users"):
        result = run_state_bench(settings, users)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.as_dict(), indent=2))
    table = Table(title=f"state bench: {users:,} users, L={result.history_length}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("changelog record", f"{result.record_bytes:,.0f} B", "")
    table.add_row("memory per user, restored", f"{result.bytes_per_user_restored:,.0f} B", "")
    table.add_row("memory per user, live", f"{result.bytes_per_user_live:,.0f} B", "≤ 2,048 B")
    table.add_row("restore rate", f"{result.restore_records_per_s:,.0f} records/s", "≥ 100,000/s")
    Console().print(table)


@app.command()
def warm() -> None:
    """Compile the hot path's kernels into numba's cache (the Dockerfiles run this)."""
    from pipeline.runner import warm_kernels

    typer.echo(f"kernels ready in {warm_kernels():.1f} s")


@app.command()
def run(
    config: ConfigOption = None,
    stats_file: Annotated[Path | None, typer.Option(help="Write run counts here on exit.")] = None,
    profile: Annotated[
        Path | None, typer.Option(help="Profile with pyinstrument; write its text report here.")
    ] = None,
) -> None:
    """Run the pipeline until SIGTERM or SIGINT, then finish the batch, flush, commit and exit."""
    from pipeline.runner import run_pipeline

    settings = _settings(config)
    try:
        settings.privacy.secret()
    except SettingsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if profile is None:
        run_pipeline(settings, stop, stats_file)
        return
    _require_train("streamscore run --profile")
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001)
    with profiler:
        run_pipeline(settings, stop, stats_file)
    profile.parent.mkdir(parents=True, exist_ok=True)
    profile.write_text(profiler.output_text(unicode=True, color=False, show_all=False))


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
    _require_train("streamscore bench")
    from dataclasses import replace

    from pipeline.bench.harness import BY_NAME, Plan
    from pipeline.bench.report import publish as publish_report
    from pipeline.bench.report import run_bench, table
    from pipeline.demo import ensure_models

    settings = _settings(config)
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
        console.print(f"{row['target']}: {row['measured']} (goal {row['goal']}, met {row['met']})")
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
    from pipeline.bench.plan import PlanError, recommend
    from pipeline.bench.report import latest

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
    _require_train("streamscore demo")
    settings = _settings(config)
    ensure_kafka(settings)
    with console.status("starting the schema registry"):
        ensure_registry(settings)
    if scenario == "drift":
        from pipeline.drift_demo import DriftPlan, run_drift_demo

        run_drift_demo(settings, console, DriftPlan())
        return
    if scenario != "main":
        raise typer.BadParameter(f"--scenario {scenario!r}: main or drift")
    from pipeline.demo import run_demo

    run_demo(settings, events=events, rate=rate, users=users, console=console)


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
    _require_train("streamscore soak")
    from pipeline.soak import SoakPlan, run_soak

    settings = _settings(config)
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


if __name__ == "__main__":
    app()

"""What the command groups share: the root app, the console, settings loading, the local
broker and registry, and the check for the `train` extra.
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from pipeline.logging import configure_logging, get_logger
from pipeline.settings import DEFAULT_REGISTRY_URL, Settings, SettingsError, load_settings
from pipeline.tools.local_broker import LocalBroker, LocalCluster
from pipeline.tools.local_registry import LocalRegistry

if TYPE_CHECKING:
    from schemas.registry import RegistryCatalog

app = typer.Typer(help="Streaming fraud scoring and item ranking on Kafka.", no_args_is_help=True)
console = Console(stderr=True)
log = get_logger()

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file.", envvar="STREAMSCORE_CONFIG"),
]
KAFKA_HOME = Path("var/kafka")
REGISTRY_HOME = Path("var/registry")


def require_train(command: str) -> None:
    """Stop with how to install the `train` extra when `command` needs it and it is missing:
    the default install serves without torch.
    """
    wanted = ("torch", "onnx", "matplotlib", "psutil", "pyinstrument")  # the extra's imports
    missing = [name for name in wanted if find_spec(name) is None]
    if missing:
        console.print(
            f"{command} needs the train extra ({', '.join(missing)} missing): "
            "pip install 'streamscore[train]'",
            style="red",
            markup=False,
        )
        raise typer.Exit(2)


def settings_from(config: Path | None) -> Settings:
    """The settings of `--config`; exit 2 naming the setting that is invalid."""
    try:
        settings = load_settings(config)
    except SettingsError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    configure_logging(settings.log_format)
    return settings


def local_broker(port: int) -> LocalBroker:
    """The local broker under var/kafka, on `port` (its controller on port + 1)."""
    return LocalBroker(KAFKA_HOME, KAFKA_HOME / "libs", port=port, controller_port=port + 1)


def local_cluster(port: int, brokers: int) -> LocalCluster:
    """The local replicated cluster under var/kafka/cluster: node i (from 1) on port + 2(i-1),
    its controller on the port after it.
    """
    ports = tuple(port + 2 * i for i in range(brokers))
    return LocalCluster(
        KAFKA_HOME / "cluster",
        KAFKA_HOME / "libs",
        ports=ports,
        controller_ports=tuple(p + 1 for p in ports),
    )


def ensure_kafka(settings: Settings, port: int = 9092) -> str:
    """The bootstrap of KAFKA_BOOTSTRAP_SERVERS, or of the local broker, started if needed."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return settings.kafka.bootstrap_servers
    return local_broker(port).up()


def local_registry(settings: Settings, port: int = 8081) -> LocalRegistry:
    """The local schema registry under var/registry, on `port` (health on port + 10)."""
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
        return local_registry(settings).up()
    return url


def registry_catalog(settings: Settings) -> RegistryCatalog:
    """The registry the settings name; exit 2 in the static mode, which has none."""
    from schemas.registry import RegistryCatalog

    registry = settings.schema_registry
    if not registry.enabled:
        console.print("[red]schema_registry.url is empty: the static catalog has no registry[/red]")
        raise typer.Exit(2)
    return RegistryCatalog(registry.client_config(), {}, registry.compatibility)


def print_metrics(results: dict[str, dict[str, object]]) -> None:
    """A table of validation metrics per model, with the baselines'."""
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

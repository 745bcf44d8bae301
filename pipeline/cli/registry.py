"""`streamscore registry`: the local schema registry."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.cli.common import ConfigOption, console, ensure_kafka, local_registry, settings_from

group = typer.Typer(help="The local schema registry (Apicurio 3, from Maven Central).")


@group.command("up")
def registry_up(
    port: Annotated[int, typer.Option(help="HTTP port; health checks on port+10.")] = 8081,
    config: ConfigOption = None,
) -> None:
    """Fetch Apicurio if needed, start it on the local broker (KafkaSQL storage), wait
    until ready.
    """
    settings = settings_from(config)
    ensure_kafka(settings)
    with console.status("starting the schema registry"):
        url = local_registry(settings, port).up()
    console.print(f"schema registry is up at {url}")


@group.command("down")
def registry_down(port: int = 8081, config: ConfigOption = None) -> None:
    """Stop the local registry; its schemas stay in its journal topic on the broker."""
    local_registry(settings_from(config), port).down()
    console.print("schema registry is down")


@group.command("status")
def registry_status(port: int = 8081, config: ConfigOption = None) -> None:
    """Say whether the local registry runs and answers."""
    registry = local_registry(settings_from(config), port)
    pid = registry.pid()
    answering = pid is not None and registry.ready(timeout_s=5)
    console.print(f"pid={pid} url={registry.url} answering={answering}")
    if not answering:
        raise typer.Exit(1)

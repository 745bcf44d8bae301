"""`streamscore schemas`: the topics' schemas in the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipeline.cli.common import ConfigOption, console, registry_catalog, settings_from

group = typer.Typer(help="Schemas in the registry: register, check, list.")


@group.command("register")
def schemas_register(config: ConfigOption = None) -> None:
    """Register every topic's schema (.avsc) under its `<topic>-value` subject, with the
    configured compatibility; a refused schema fails with the subject named.
    """
    from pipeline.topics import monitor_outputs, pipeline_outputs, producer_outputs
    from schemas.catalog import IncompatibleSchema, subject

    settings = settings_from(config)
    catalog = registry_catalog(settings)
    outputs = producer_outputs(settings) | pipeline_outputs(settings) | monitor_outputs(settings)
    for topic, name in outputs.items():
        try:
            schema_id = catalog.register(name, subject(topic))
        except IncompatibleSchema as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
        console.print(f"{subject(topic)}: {name} id {schema_id}")


@group.command("check")
def schemas_check(
    schema_file: Annotated[Path, typer.Argument(help="A candidate .avsc file.")],
    topic: Annotated[str | None, typer.Option(help="Its topic; default: the input.")] = None,
    config: ConfigOption = None,
) -> None:
    """Exit 0 when SCHEMA_FILE may be registered under the topic's subject by its
    compatibility rule, 1 when the registry would refuse it.
    """
    from schemas.catalog import subject

    settings = settings_from(config)
    catalog = registry_catalog(settings)
    name = subject(topic or settings.topics.input)
    candidate = json.loads(schema_file.read_text())
    if catalog.check(name, candidate):
        console.print(f"{schema_file} is compatible with {name}")
        return
    console.print(f"[red]{schema_file} is not compatible with {name}[/red]")
    raise typer.Exit(1)


@group.command("list")
def schemas_list(config: ConfigOption = None) -> None:
    """Every subject in the registry with its versions and their ids."""
    from rich.table import Table

    catalog = registry_catalog(settings_from(config))
    table = Table(title=f"subjects at {catalog.describe()['url']}")
    table.add_column("subject")
    table.add_column("version", justify="right")
    table.add_column("id", justify="right")
    for name, versions in sorted(catalog.subjects().items()):
        for version, schema_id in versions:
            table.add_row(name, str(version), str(schema_id))
    Console().print(table)

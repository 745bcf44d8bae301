"""`streamscore kafka`: the local broker."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from pipeline.cli.common import console, local_broker

group = typer.Typer(help="The local Apache Kafka broker (KRaft, from Maven Central).")


@group.command("up")
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
        bootstrap = local_broker(port).up()
    console.print(f"Kafka is up at {bootstrap}")


@group.command("down")
def kafka_down(
    port: int = 9092, purge: Annotated[bool, typer.Option(help="Also delete its data.")] = False
) -> None:
    """Stop the local broker."""
    local_broker(port).down(purge=purge)
    console.print("Kafka is down" + (" and its data deleted" if purge else ""))


@group.command("status")
def kafka_status(port: int = 9092) -> None:
    """Say whether the local broker runs and answers."""
    broker = local_broker(port)
    pid = broker.pid()
    answering = pid is not None and broker.ready(timeout_s=5)
    console.print(f"pid={pid} bootstrap={broker.bootstrap} answering={answering}")
    if not answering:
        raise typer.Exit(1)

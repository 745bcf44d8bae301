"""`streamscore kafka`: the local broker, or a local replicated cluster."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from pipeline.cli.common import console, local_broker, local_cluster

group = typer.Typer(help="The local Apache Kafka broker or cluster (KRaft, from Maven Central).")

Brokers = Annotated[
    int,
    typer.Option(
        min=1,
        help="1: one broker. 3 or more: a replicated cluster under var/kafka/cluster, node i "
        "on port + 2(i-1), its topics RF 3 and min.insync.replicas 2 by default (set "
        "topics.replication_factor = 3 for streamscore's own).",
    ),
]


@group.command("up")
def kafka_up(
    port: Annotated[int, typer.Option(help="PLAINTEXT port; controller uses port+1.")] = 9092,
    brokers: Brokers = 1,
) -> None:
    """Fetch the broker jars if needed, format storage once, start, and wait until it answers."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        console.print(
            f"KAFKA_BOOTSTRAP_SERVERS is set; using {os.environ['KAFKA_BOOTSTRAP_SERVERS']}"
        )
        return
    with console.status("starting Kafka"):
        bootstrap = (local_cluster(port, brokers) if brokers > 1 else local_broker(port)).up()
    console.print(f"Kafka is up at {bootstrap}")


@group.command("down")
def kafka_down(
    port: int = 9092,
    brokers: Brokers = 1,
    purge: Annotated[bool, typer.Option(help="Also delete its data.")] = False,
) -> None:
    """Stop the local broker (or cluster)."""
    if brokers > 1:
        local_cluster(port, brokers).down(purge=purge)
    else:
        local_broker(port).down(purge=purge)
    console.print("Kafka is down" + (" and its data deleted" if purge else ""))


@group.command("status")
def kafka_status(port: int = 9092, brokers: Brokers = 1) -> None:
    """Say whether the local broker (or each node of the cluster) runs and answers."""
    nodes = local_cluster(port, brokers).nodes if brokers > 1 else [local_broker(port)]
    answering = True
    for node in nodes:
        pid = node.pid()
        ok = pid is not None and node.ready(timeout_s=5)
        answering &= ok
        console.print(f"node={node.node_id} pid={pid} bootstrap={node.bootstrap} answering={ok}")
    if not answering:
        raise typer.Exit(1)

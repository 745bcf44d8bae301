"""`streamscore state`: the per-user state's size and restore speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipeline.cli.common import ConfigOption, console, ensure_kafka, settings_from

group = typer.Typer(help="Per-user feature state: its size and restore speed.")


@group.command("bench")
def state_bench(
    users: Annotated[int, typer.Option(help="Full-history users to measure.")] = 200_000,
    out: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = Path(
        "var/bench/state.json"
    ),
    config: ConfigOption = None,
) -> None:
    """Bytes of state per user and changelog restore rate, on the local broker."""
    from rich.table import Table

    from pipeline.tools.state_bench import run_state_bench

    settings = settings_from(config)
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
    table.add_row(
        "memory per user, restored (the pool sized once)",
        f"{result.bytes_per_user_restored:,.0f} B",
        "≤ 2,048 B",
    )
    table.add_row(
        "memory per user, live (the pool grown by doubling)",
        f"{result.bytes_per_user_live:,.0f} B",
        f"{result.live_unused_pool_bytes_per_user:,.0f} B of it pool rows reserved, unused",
    )
    table.add_row(
        "restore rate, changelog", f"{result.restore_records_per_s:,.0f} records/s", "≥ 100,000/s"
    )
    table.add_row(
        "changelog read through, nothing kept",
        f"{result.read_through_records_per_s:,.0f} records/s",
        "the restore's ceiling",
    )
    table.add_row(
        "snapshot written",
        f"{result.snapshot_bytes / 1e6:,.0f} MB in {result.snapshot_write_s:.2f} s",
        "",
    )
    table.add_row(
        "restore rate, local snapshot",
        f"{result.snapshot_restore_records_per_s:,.0f} records/s",
        "≥ 1,000,000/s",
    )
    Console().print(table)

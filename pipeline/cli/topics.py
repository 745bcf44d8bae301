"""`streamscore topics`: the pipeline's topics."""

from __future__ import annotations

import typer

from pipeline.cli.common import ConfigOption, console, settings_from

group = typer.Typer(help="Topics of the pipeline.")


@group.command("create")
def topics_create(config: ConfigOption = None) -> None:
    """Create the pipeline's topics where missing, and the compacted state changelog."""
    from pipeline.serve.state.changelog import ensure_changelog
    from pipeline.topics import create_topics

    settings = settings_from(config)
    created = create_topics(settings)
    changelog = ensure_changelog(settings)
    console.print(f"created: {', '.join(created) or 'nothing, all exist'}; changelog {changelog}")

"""The `streamscore` command line: one module per command group, each registered on `app`.

- `serve`: run the pipeline, warm its kernels, the monitor, erasure requests, lag;
- `models`: train, retrain from labels, promote, evaluate;
- `tools`: produce synthetic clickstream, the demo, bench, plan, soak;
- `kafka`, `registry`: the local broker and schema registry; `schemas`, `topics`: what
  they hold; `engines`: build and benchmark the engines; `state`: the state bench.
"""

from __future__ import annotations

from pipeline.cli import engines, kafka, models, registry, schemas, serve, state, tools, topics
from pipeline.cli.common import app

for group, name in (
    (kafka.group, "kafka"),
    (topics.group, "topics"),
    (state.group, "state"),
    (engines.group, "engines"),
    (registry.group, "registry"),
    (schemas.group, "schemas"),
):
    app.add_typer(group, name=name)

__all__ = ["app", "models", "serve", "tools"]

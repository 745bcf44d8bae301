"""`python -m pipeline.cli`: the `streamscore` command line."""

from pipeline.cli import app

app()

"""streamscore's streaming service.

One event's path, in `serve/`: consume → decode → features → score → encode → produce →
commit. Beside it: `monitor/` (the feedback loop), `training/` (torch: train, export,
evaluate, retrain), `tools/` (local broker and registry, load, demos, benchmarks), `cli/`
(the `streamscore` command), `kafka/` (client configuration and admin shared by all of them).
"""

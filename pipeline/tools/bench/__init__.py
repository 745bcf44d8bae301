"""`streamscore bench`: streamscore against the Kafka ceiling, a naive loop and a peer
framework, on the same generated events and the same local broker.

`workload` says what a run runs (the configurations, the plan, the events); `phases`
runs each configuration as its own processes, and `probe` measures them from outside;
`baselines` and `peer_quix` are the comparison jobs; `report` writes results.json,
report.md and the plots.
"""

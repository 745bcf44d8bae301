"""streamscore's streaming service: consume → decode → features → score → encode → produce → commit."""

"""streamscore's streaming service.

One event's path: consume → decode → features → score → encode → produce → commit.
"""

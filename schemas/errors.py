"""The one base of streamscore's exceptions, so a caller can catch everything the project
raises on purpose. It lives in the leaf package because engines/ and pipeline/ both import
schemas/ and nothing imports the other way. Each exception also keeps the builtin base that
says what kind of failure it is (ValueError, TimeoutError, ...). `serve.commit.Rewind` is
control flow, not an error, and deliberately outside this hierarchy.
"""


class StreamscoreError(Exception):
    """Something streamscore raises on purpose, with a message that says what and where."""

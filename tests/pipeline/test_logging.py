"""structlog set-up."""


def test_logging_survives_a_replaced_and_closed_stderr(monkeypatch):
    import io
    import sys

    from pipeline.logging import configure_logging, get_logger

    stale = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stale)
    configure_logging("json")
    stale.close()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    get_logger(topic="t", partition=1, offset=5).info("still_logging")
    assert '"event": "still_logging"' in sys.stderr.getvalue()
    assert '"partition": 1' in sys.stderr.getvalue()

"""The pipeline on a thread, as the integration tests run it.

If it stops on an error, the error is raised where the test checks or closes it: a pipeline
that died mid-test would otherwise show only as a wait that failed for want of it (a metrics
port refusing, a commit not coming), with the cause left in a warning after the test.
"""

import threading

from pipeline.serve.runner import RunStats, run_pipeline
from pipeline.settings import Settings


class PipelineStopped(AssertionError):
    """The pipeline's thread ended on an error; the error is this one's cause."""


class Running:
    """run_pipeline(settings) on a thread until `close`."""

    def __init__(self, settings: Settings):
        self.stop = threading.Event()
        self.stats: RunStats | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(settings,), name="pipeline")
        self.thread.start()

    def _run(self, settings: Settings) -> None:
        try:
            self.stats = run_pipeline(settings, self.stop)
        except BaseException as exc:  # raised again in the test's thread
            self.error = exc

    def check(self) -> None:
        """Raise PipelineStopped if the pipeline ended on an error."""
        if self.error is not None:
            raise PipelineStopped(f"the pipeline stopped on {self.error!r}") from self.error

    def close(self, timeout_s: float = 90) -> RunStats:
        """Stop it, wait for it, and return its stats; raise what it failed on."""
        self.stop.set()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the pipeline did not stop in {timeout_s}s"
        self.check()
        assert self.stats is not None
        return self.stats

"""What SREs see: Prometheus metrics, `/healthz` and `/readyz`, on `telemetry.port`.

prometheus-client serves metrics but has no health endpoints, so the small HTTP handler
here is hand-written: `/metrics` renders the registry, `/healthz` is 200 while the consume
loop has beaten within `telemetry.liveness_timeout_s` and its checkpoint has not held
processed input uncommitted for longer than that, and `/readyz` is 200 only once the
engines are loaded, the group is joined, no state restore is running and the input is not
held for an outage of the schema registry.

Consumer lag per partition comes from librdkafka's statistics (`statistics.interval.ms`),
so it costs no extra requests to the broker.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from pipeline.logging import get_logger

log = get_logger()

_STAGE_BUCKETS = (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000)


class Health:
    """A process's metrics registry, liveness and readiness, and the HTTP server of
    `/metrics`, `/healthz` and `/readyz`: the pipeline's (`Telemetry`) and the monitor's.
    """

    def __init__(self, liveness_timeout_s: float = 120.0) -> None:
        """An empty registry; not ready until engines are loaded and the group joined."""
        self.registry = CollectorRegistry()
        self._liveness_timeout_s = liveness_timeout_s
        self._beat = time.monotonic()
        self._engines_loaded = False
        self._joined = False
        self._restoring = 0
        self._held = False
        self._stalled_s: Callable[[], float] = lambda: 0.0
        self._server: ThreadingHTTPServer | None = None

    # -- health --------------------------------------------------------------------------

    def beat(self) -> None:
        """The consume loop (or a long restore) is making progress."""
        self._beat = time.monotonic()

    def engines_loaded(self, loaded: bool = True) -> None:
        """Engines are (or are no longer) loaded."""
        self._engines_loaded = loaded

    def joined(self) -> None:
        """The consumer received its first assignment (possibly empty)."""
        self._joined = True

    def restoring(self, started: bool) -> None:
        """A state restore began or ended."""
        self._restoring += 1 if started else -1

    def held(self, cause: str | None) -> None:
        """The input is held for an unavailable dependency (`cause`), or no longer (None)."""
        self._held = cause is not None

    def watch(self, stalled_s: Callable[[], float]) -> None:
        """Also count as stalled a loop whose checkpoint has committed nothing for the
        liveness timeout while processed input waits (`stalled_s`, `commit.Progress`): a
        loop that beats while every commit fails is not alive either.
        """
        self._stalled_s = stalled_s

    def alive(self) -> bool:
        """Whether the loop beat recently, and its checkpoint has not stalled."""
        timeout = self._liveness_timeout_s
        return time.monotonic() - self._beat <= timeout and self._stalled_s() <= timeout

    def ready(self) -> bool:
        """Engines loaded, group joined, no restore running, input not held, and alive."""
        return (
            self._engines_loaded
            and self._joined
            and self._restoring == 0
            and not self._held
            and self.alive()
        )

    # -- serving -------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics, /healthz and /readyz on a daemon thread; return the bound port."""
        telemetry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._send(HTTPStatus.OK, generate_latest(telemetry.registry), True)
                elif self.path == "/healthz":
                    ok = telemetry.alive()
                    self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, b"")
                elif self.path == "/readyz":
                    ok = telemetry.ready()
                    self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, b"")
                else:
                    self._send(HTTPStatus.NOT_FOUND, b"")

            def _send(self, status: HTTPStatus, body: bytes, metrics: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST if metrics else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                """Probes every few seconds would flood the logs."""

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="telemetry", daemon=True).start()
        bound = int(self._server.server_address[1])
        log.info("telemetry_serving", host=host, port=bound)
        return bound

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class Telemetry(Health):
    """The pipeline's metrics and health."""

    def __init__(self, liveness_timeout_s: float = 120.0) -> None:
        """Create every metric; nothing is served until `serve`."""
        super().__init__(liveness_timeout_s)
        registry = self.registry
        self.consumed = Counter(
            "streamscore_consumed", "Input messages consumed.", ["topic"], registry=registry
        )
        self.produced = Counter(
            "streamscore_produced", "Output records produced.", ["topic"], registry=registry
        )
        self.dead_letters = Counter(
            "streamscore_dead_letters",
            "Inputs sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=registry,
        )
        self.lag = Gauge(
            "streamscore_consumer_lag",
            "High watermark minus the consumer's position, per partition.",
            ["topic", "partition"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "streamscore_batch_size",
            "Events per micro-batch.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "streamscore_stage_seconds",
            "Seconds per batch in each stage.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        self.end_to_end_seconds = Histogram(
            "streamscore_end_to_end_seconds",
            "From the input's Kafka timestamp to its outputs being produced.",
            buckets=_E2E_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "streamscore_in_flight", "Outputs produced, not yet acknowledged.", registry=registry
        )
        self.users = Gauge("streamscore_state_users", "Users held in state.", registry=registry)
        self.state_bytes = Gauge(
            "streamscore_state_bytes",
            "Estimated bytes of user state (sampled).",
            registry=registry,
        )
        self.rebalances = Counter(
            "streamscore_rebalances",
            "Assignments, revocations and losses.",
            ["kind"],
            registry=registry,
        )
        self.transaction_failures = Counter(
            "streamscore_transaction_failures",
            "Exactly-once transactions that failed, by what was done: abort (aborted and "
            "rewound), replace (a new producer after a fatal error or a failed abort), "
            "stalled (a commit that did not return within the bound, abandoned).",
            ["kind"],
            registry=registry,
        )
        self.restore_seconds = Histogram(
            "streamscore_restore_seconds",
            "Seconds per state restore.",
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=registry,
        )
        self.forgotten = Counter(
            "streamscore_users_forgotten",
            "Users dropped from state by an erasure request (`streamscore forget`).",
            registry=registry,
        )
        self.restored = Counter(
            "streamscore_restored_records",
            "User states restored, by source: the changelog, or a local snapshot.",
            ["source"],
            registry=registry,
        )
        self.engine = Info(
            "streamscore_engine",
            "Model and backend serving each role.",
            ["role"],
            registry=registry,
        )
        self.gc_pause_seconds = Histogram(
            "streamscore_gc_pause_seconds",
            "Python garbage-collector pauses, by generation.",
            ["generation"],
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        self.registry_unavailable = Counter(
            "streamscore_schema_registry_unavailable",
            "Times the schema registry did not answer a lookup the input needed, by cause; "
            "the input is held (paused, not dead-lettered) until it answers.",
            ["cause"],
            registry=registry,
        )
        self.input_held = Gauge(
            "streamscore_input_held",
            "1 while the input is paused for an unavailable dependency.",
            registry=registry,
        )
        self._gc_started = 0.0

    def held(self, cause: str | None) -> None:
        """The input is held for an unavailable dependency (`cause`), or no longer (None)."""
        super().held(cause)
        self.input_held.set(1 if self._held else 0)
        if cause is not None:
            self.registry_unavailable.labels(cause=cause).inc()

    # -- garbage collector ---------------------------------------------------------------

    def watch_gc(self) -> None:
        """Time every collection into `gc_pause_seconds` until `unwatch_gc`."""
        gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        """Stop timing collections."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            seconds = time.perf_counter() - self._gc_started
            self.gc_pause_seconds.labels(generation=str(info["generation"])).observe(seconds)

    # -- librdkafka statistics -----------------------------------------------------------

    def on_stats(self, stats_json: str) -> None:
        """Consumer statistics callback: per-partition lag."""
        stats = json.loads(stats_json)
        for topic, body in stats.get("topics", {}).items():
            for partition, numbers in body.get("partitions", {}).items():
                lag = numbers.get("consumer_lag", -1)
                if partition != "-1" and lag >= 0:
                    self.lag.labels(topic=topic, partition=partition).set(lag)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """`histogram.observe(v)` for every v in `values`, in one pass per batch.

    prometheus-client observes one value per call (a Python loop over the bucket bounds);
    at a whole batch per call this counts the values per bucket with numpy and adds each
    count once. It relies on Histogram's `_upper_bounds`, `_buckets` (not cumulative) and
    `_sum`, stable since prometheus-client 0.4; tests/pipeline/test_telemetry.py checks the
    exposition equals one observe() per value.
    """
    if not len(values):
        return
    bounds = histogram._upper_bounds
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for bucket, count in zip(histogram._buckets, counts.tolist(), strict=False):
        if count:
            bucket.inc(count)
    histogram._sum.inc(float(values.sum()))

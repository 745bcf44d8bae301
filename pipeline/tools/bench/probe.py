"""Measuring from outside: the probe, a read_committed consumer of an output topic that
times each output from its input's Kafka timestamp; the window of arrivals a rate is taken
over; the CPU meter of a configuration's processes, the broker and the bench; and the
percentiles of one offered rate.
"""

from __future__ import annotations

import math
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import psutil
from confluent_kafka import Consumer, TopicPartition

import schemas
from pipeline.kafka.admin import (
    topic_partitions,
)
from pipeline.serve.decode import varint
from pipeline.serve.kernel import kernel
from pipeline.serve.records import join
from pipeline.settings import Settings
from schemas.codec import Decoder


@dataclass(slots=True)
class Latency:
    """Latency at one offered rate."""

    fraction: float
    offered_eps: float
    achieved_eps: float
    events: int
    received: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    # Of p99_ms, the part up to the output's own Kafka timestamp (the pipeline's produce
    # call): the rest is the output's way to a reader. NaN where outputs carry their
    # input's timestamp (`Config.stamps_outputs`).
    p99_to_output_ms: float
    cpu_percent: float  # the configuration's processes while the load was offered
    broker_cpu_percent: float
    bench_cpu_percent: float  # this process: the paced producer and the probe
    fixed: bool = False  # offered at one of `Plan.fixed_rates`, not a fraction of max


class CpuMeter:
    """CPU seconds of a set of processes, the broker and this process over a window."""

    def __init__(self, pids: Sequence[int], broker: psutil.Process | None) -> None:
        """Start measuring now."""
        self._procs = [psutil.Process(pid) for pid in pids]
        self._broker = broker
        self._self = psutil.Process()
        self._start = time.monotonic()
        self._cpu = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        def cpu(proc: psutil.Process | None) -> float:
            if proc is None:
                return 0.0
            try:
                times = proc.cpu_times()
            except psutil.Error:
                return 0.0
            return float(times.user + times.system)

        return sum(cpu(p) for p in self._procs), cpu(self._broker), cpu(self._self)

    def stop(self) -> None:
        """End the window."""
        end = self._sample()
        self._seconds = max(time.monotonic() - self._start, 1e-9)
        self._delta = tuple(b - a for a, b in zip(self._cpu, end, strict=True))

    def percent(self) -> float:
        """CPU of the measured processes, percent of one core (two busy cores: 200)."""
        return 100 * self._delta[0] / self._seconds

    def broker_percent(self) -> float:
        """CPU of the broker over the window."""
        return 100 * self._delta[1] / self._seconds

    def self_percent(self) -> float:
        """CPU of the bench process (producer and probe) over the window."""
        return 100 * self._delta[2] / self._seconds


@dataclass(slots=True)
class Window:
    """Arrival times of outputs; the steady rate between the 10th and 95th percentile."""

    arrivals: np.ndarray
    meter: CpuMeter | None

    @property
    def count(self) -> int:
        """Outputs read."""
        return len(self.arrivals)

    @property
    def seconds(self) -> float:
        """Length of the measured window."""
        lo, hi = self._bounds()
        return float(self.arrivals[hi] - self.arrivals[lo]) if hi > lo else 0.0

    def _bounds(self) -> tuple[int, int]:
        n = len(self.arrivals)
        return int(n * 0.10), max(int(n * 0.95) - 1, 0)

    def rate(self) -> float:
        """Outputs per second in the window."""
        lo, hi = self._bounds()
        seconds = self.seconds
        return (hi - lo) / seconds if seconds > 0 else 0.0


def ingest_times(values: list[bytes], decoder: Decoder) -> list[float]:
    """The `ingest_time` of each framed FraudScore in `values`: walked to by a kernel, or
    decoded (`decoder`) where the walk fails. fastavro took 10 µs a record, which at half
    the bench's maximum rate was a third of a core of the two the measured pipeline and
    the broker share; the walk and the join are under 1 µs.
    """
    buffer, starts, _ = join(values)
    found = np.empty(len(values), dtype=np.int64)
    walked = np.empty(len(values), dtype=np.bool_)
    _ingest_times(buffer, starts, found, walked)
    times = found.astype(np.float64)
    for i in np.flatnonzero(~walked).tolist():
        times[i] = float(decoder.decode(values[i])["ingest_time"])
    return times.tolist()


@kernel
def _skip_string(buf: np.ndarray, pos: int, end: int) -> int:
    """The position after the string at `pos`, or a negative one."""
    length, pos = varint(buf, pos, end)
    if pos < 0 or length < 0 or pos + length > end:
        return -1
    return int(pos + length)


@kernel
def _ingest_times(buf: np.ndarray, starts: np.ndarray, out: np.ndarray, ok: np.ndarray) -> None:
    """Into `out`, each record's `ingest_time`; `ok` is False where it is not a FraudScore
    of the schema the pipeline writes (schemas/fraud_score.avsc): event_id, user_id (strings),
    event_time (long), score (double), decision (enum), reasons (array of {string, double}),
    model_name, model_version (strings), then ingest_time (long).
    """
    for i in range(len(starts) - 1):
        ok[i] = False
        pos, end = starts[i] + 5, starts[i + 1]  # after the magic byte and the schema id
        if pos > end or buf[starts[i]] != 0:
            continue
        pos = _skip_string(buf, pos, end)
        if pos >= 0:
            pos = _skip_string(buf, pos, end)
        if pos >= 0:
            _, pos = varint(buf, pos, end)  # event_time
        if pos >= 0:
            pos = pos + 8 if pos + 8 <= end else -1  # score
        if pos >= 0:
            _, pos = varint(buf, pos, end)  # decision
        while pos >= 0:  # reasons: blocks of items, ended by a zero count
            count, pos = varint(buf, pos, end)
            if pos < 0 or count == 0:
                break
            if count < 0:  # a negative count is followed by the block's size in bytes
                count = -count
                _, pos = varint(buf, pos, end)
            for _ in range(count):
                if pos >= 0:
                    pos = _skip_string(buf, pos, end)
                if pos >= 0:
                    pos = pos + 8 if pos + 8 <= end else -1
        if pos >= 0:
            pos = _skip_string(buf, pos, end)
        if pos >= 0:
            pos = _skip_string(buf, pos, end)
        if pos >= 0:
            out[i], pos = varint(buf, pos, end)
            ok[i] = pos >= 0


class Probe:
    """A read_committed consumer of one output topic, assigned every partition from the start.

    Untimed, it counts arrivals; timed, a thread records (read time, input timestamp,
    output timestamp) for each, the input timestamp being the FraudScore's `ingest_time` or,
    for the ceiling's mirrored bytes, the Kafka timestamp it copied.
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        timed: bool,
        ceiling: bool = False,
        split: bool = False,
    ):
        """Read `topic` on the broker of `settings`; with `split`, the outputs' own Kafka
        timestamps say when they were produced.
        """
        self._consumer = Consumer(
            settings.kafka.client_config()
            | {
                "group.id": f"probe-{time.monotonic_ns()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                # At most one fetch per 5 ms, as the pipeline's consumer fetches: with the
                # default 1 byte a probe of a steady stream fetches once per round trip.
                "fetch.wait.max.ms": 5,
                "fetch.min.bytes": 65_536,
            }
        )
        self._topic = topic
        partitions = topic_partitions(self._consumer, topic, timeout_s=30)
        self._consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        self._ceiling = ceiling
        self._split = split
        self._decoder = Decoder(schemas.FRAUD_SCORE)
        self._read: list[float] = []
        self._ingest: list[float] = []
        self._produced: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timed:
            self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
            self._thread.start()

    def count_until(
        self,
        expected: int,
        max_s: float,
        procs: Sequence[subprocess.Popen[bytes]],
        broker: psutil.Process | None,
        start_timeout_s: float = 180,
    ) -> Window:
        """Read until `expected` outputs arrived, or `max_s` after the first one; CPU of
        `procs` and `broker` is metered from the first output on.
        """
        arrivals: list[float] = []
        meter: CpuMeter | None = None
        deadline = time.monotonic() + start_timeout_s
        while len(arrivals) < expected and time.monotonic() < deadline:
            messages = self._consumer.consume(1000, 0.005)
            now = time.monotonic()
            good = sum(1 for m in messages if m.error() is None)
            if good and not arrivals:
                meter = CpuMeter([proc.pid for proc in procs], broker)
                deadline = now + max_s
            arrivals.extend([now] * good)
            if not good:
                check_alive(procs)
        if meter is not None:
            meter.stop()
        if not arrivals:
            raise TimeoutError(
                f"no output on {self._topic} in {start_timeout_s:.0f}s "
                f"({expected} expected); see the configuration's logs"
            )
        return Window(np.asarray(arrivals[:expected]), meter)

    def _run(self) -> None:
        while not self._stop.is_set():
            # consume() returns early only with a full batch: the timeout bounds the error.
            messages = self._consumer.consume(10_000, 0.001)
            now_ms = time.time() * 1000
            messages = [message for message in messages if message.error() is None]
            timestamps = [float(message.timestamp()[1]) for message in messages]
            if self._ceiling:  # it copied its input's
                ingest = timestamps
            else:
                values = [cast(bytes, message.value()) for message in messages]
                ingest = ingest_times(values, self._decoder)
            produced = timestamps if self._split else [math.nan] * len(messages)
            read = [now_ms] * len(messages)
            if read:
                with self._lock:
                    self._read.extend(read)
                    self._ingest.extend(ingest)
                    self._produced.extend(produced)

    def wait_for(
        self,
        start_ms: float,
        end_ms: float,
        count: int,
        timeout_s: float,
        procs: Sequence[subprocess.Popen[bytes]],
    ) -> int:
        """Wait until `count` outputs of inputs produced in [start_ms, end_ms] were read,
        checking that the processes live; return the number read, short after `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while (received := len(self.latencies_between(start_ms, end_ms))) < count:
            if time.monotonic() >= deadline:
                break
            check_alive(procs)
            time.sleep(0.05)
        return received

    def latencies_between(self, start_ms: float, end_ms: float) -> np.ndarray:
        """Latency (ms) of outputs whose input was produced in [start_ms, end_ms]."""
        return self.split_between(start_ms, end_ms)[0]

    def split_between(self, start_ms: float, end_ms: float) -> tuple[np.ndarray, np.ndarray]:
        """For outputs whose input was produced in [start_ms, end_ms]: their latency (ms),
        and its part up to the output's own Kafka timestamp.
        """
        with self._lock:
            read = np.asarray(self._read)
            ingest = np.asarray(self._ingest)
            produced = np.asarray(self._produced)
        chosen = (ingest >= start_ms) & (ingest <= end_ms)
        return read[chosen] - ingest[chosen], produced[chosen] - ingest[chosen]

    def close(self) -> None:
        """Stop reading."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._consumer.close()


def latency_of(
    fraction: float,
    rate: float,
    sent: int,
    seconds: float,
    latencies: np.ndarray,
    to_output: np.ndarray,
    meter: CpuMeter,
) -> Latency:
    def pct(q: float, values: np.ndarray = latencies) -> float:
        return round(float(np.percentile(values, q)), 2) if len(values) else float("nan")

    return Latency(
        fraction=fraction,
        offered_eps=round(rate, 1),
        achieved_eps=round(sent / max(seconds, 1e-9), 1),
        events=sent,
        received=len(latencies),
        p50_ms=pct(50),
        p95_ms=pct(95),
        p99_ms=pct(99),
        max_ms=round(float(latencies.max()), 2) if len(latencies) else float("nan"),
        p99_to_output_ms=pct(99, to_output),
        cpu_percent=round(meter.percent(), 1),
        broker_cpu_percent=round(meter.broker_percent(), 1),
        bench_cpu_percent=round(meter.self_percent(), 1),
    )


def check_alive(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Raise when one of the processes under test has exited."""
    for proc in procs:
        if proc.poll() is not None:
            raise RuntimeError(f"a bench process exited early with {proc.returncode}; see logs")

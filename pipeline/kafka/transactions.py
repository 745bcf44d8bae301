"""Transactional producer calls with a bound: librdkafka's wait forever by default."""

from __future__ import annotations

import time
from collections.abc import Callable

from confluent_kafka import KafkaException

from pipeline.kafka.errors import kafka_error
from pipeline.logging import get_logger

log = get_logger()
# A transactional call (with its retries) gives up after this long unless told otherwise:
# `processing.transaction_call_timeout_ms`'s default.
CALL_BOUND_S = 30.0


def transactional_call(
    call: Callable[..., object], *args: object, bound_s: float = CALL_BOUND_S, timed: bool = True
) -> None:
    """Run a transactional producer call, retrying it while its error says it is retriable
    (a broker restarting, a coordinator moving) until `bound_s` has passed; then its last
    error is raised. A `timed` call (all but `begin_transaction`, which is local) is given
    what is left of the bound as its own timeout: librdkafka's default is to wait forever.
    """
    deadline = time.monotonic() + bound_s
    delay = 0.1
    while True:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            if timed:
                call(*args, remaining)
            else:
                call(*args)
            return
        except KafkaException as exc:
            error = kafka_error(exc)
            if not error.retriable() or time.monotonic() + delay > deadline:
                raise
            log.warning("transaction_call_retried", call=call.__name__, reason=error.str())
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

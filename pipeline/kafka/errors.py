"""The one way to read a confluent-kafka exception's error, and the clients' error callback."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException

from pipeline.logging import get_logger

log = get_logger()


def kafka_error(exc: KafkaException) -> KafkaError:
    """The `KafkaError` that `exc` carries. confluent-kafka raises KafkaException with it as
    the only argument; a bare message (which the client never raises, but a caller might)
    becomes an unknown error with that text, so callers can always ask code(), retriable(),
    fatal() and txn_requires_abort().
    """
    error = exc.args[0] if exc.args else None
    if isinstance(error, KafkaError):
        return error
    return KafkaError(KafkaError.UNKNOWN, str(error) if error is not None else "")


def on_client_error(error: KafkaError) -> None:
    """A client's `error_cb`: librdkafka's errors outside any call (a broker down, a
    coordinator moving), logged; a fatal one also surfaces at the next call.
    """
    log.warning("kafka_client_error", code=error.name(), reason=error.str(), fatal=error.fatal())

from confluent_kafka import KafkaError, KafkaException

from pipeline.kafka.errors import kafka_error


def test_the_error_a_client_raises_is_returned_as_it_is():
    error = KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True)
    assert kafka_error(KafkaException(error)) is error


def test_an_exception_without_a_kafka_error_reads_as_an_unknown_one_with_its_text():
    error = kafka_error(KafkaException("boom"))
    assert error.code() == KafkaError.UNKNOWN and error.str() == "boom"
    assert not error.retriable() and not error.fatal() and not error.txn_requires_abort()
    assert kafka_error(KafkaException()).code() == KafkaError.UNKNOWN

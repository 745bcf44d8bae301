from confluent_kafka import Consumer

from pipeline.kafka.clients import consumer_config
from pipeline.settings import load_settings


def test_the_consumer_config_is_one_librdkafka_takes_with_the_heartbeat_set():
    settings = load_settings(consumer={"heartbeat_interval_ms": 700})
    config = consumer_config(settings.kafka, settings.consumer)
    assert config["heartbeat.interval.ms"] == 700
    assert config["session.timeout.ms"] == settings.consumer.session_timeout_ms
    Consumer(config).close()  # librdkafka refuses unknown or malformed properties here

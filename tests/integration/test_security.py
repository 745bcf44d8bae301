"""The pipeline through a SASL_SSL listener (SCRAM-SHA-512, a CA made here), secrets kept
out of logs and metrics, and a wrong password failing fast with a clear error.
"""

import secrets
import subprocess
import time
import urllib.request

import pytest
from confluent_kafka import Producer

import schemas
from pipeline.kafka.admin import KafkaConnectionError
from pipeline.kafka.clients import producer_config
from pipeline.serve.state.changelog import ensure_changelog
from pipeline.settings import load_settings
from pipeline.tools.demo import read_topic
from pipeline.tools.local_broker import REPO_ROOT, LocalBroker, SaslSslListener, free_port
from pipeline.topics import create_topics
from pipeline.training.generator import GeneratorConfig, generate
from schemas.codec import Encoder
from tests.integration.running import Running
from tests.integration.test_pipeline import wait_for_commit

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER, PASSWORD = "streamscore", "s3cret-Pa55word-for-the-test"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory):
    """A throwaway CA, and a server certificate for 127.0.0.1 signed by it."""
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=streamscore-test-ca",
        "-days",
        "2",
        cwd=directory,
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
        cwd=directory,
    )
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        cwd=directory,
    )
    keystore = directory / "server.pem"
    keystore.write_text(
        (directory / "server.key").read_text() + (directory / "server.crt").read_text()
    )
    return directory / "ca.crt", keystore


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    ca, keystore = make_certificates(directory)
    listener = SaslSslListener(port=free_port(), keystore_pem=keystore, users=((USER, PASSWORD),))
    broker = LocalBroker(
        home=tmp_path_factory.mktemp("kafka-secure"),
        libs=REPO_ROOT / "var" / "kafka" / "libs",
        port=free_port(),
        controller_port=free_port(),
        sasl_ssl=listener,
    )
    broker.up()
    yield f"127.0.0.1:{listener.port}", ca
    broker.down(purge=True)


def secure_settings(bootstrap, ca, model_dir, password_file):
    run = str(time.monotonic_ns())
    return load_settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": USER,
            "sasl_password_file": str(password_file),
            "ssl_ca_location": str(ca),
        },
        topics={
            "input": f"s-{run}.in",
            "fraud_scores": f"s-{run}.fraud",
            "recommendations": f"s-{run}.recs",
            "dead_letter": f"s-{run}.dlq",
            "labels": f"s-{run}.labels",
            "forget": f"s-{run}.forget",
            "input_histograms": f"s-{run}.input-histograms",
            "model_quality": f"s-{run}.model-quality",
            "partitions": 2,
        },
        consumer={"group_id": f"g-{run}"},
        checkpoint={"interval_ms": 200},
        engine={"model_dir": str(model_dir), "backend": "onnxruntime"},
        telemetry={"port": free_port()},
        schema_registry={"url": ""},
        privacy={"pseudonym_key": secrets.token_urlsafe(32)},
        log_format="json",
    )


def test_pipeline_runs_through_sasl_ssl_and_never_shows_the_password(
    secure_broker, model_dir, tmp_path, capfd
):
    bootstrap, ca = secure_broker
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    settings = secure_settings(bootstrap, ca, model_dir, password_file)
    create_topics(settings)
    config = GeneratorConfig(events=400, users=20, seed=4).anchored_before(time.time())
    events = [event for event, _ in generate(config)]
    producer = Producer(producer_config(settings.kafka))
    encoder = Encoder(schemas.CLICK_EVENT)
    for event in events:
        producer.produce(settings.topics.input, key=event["user_id"], value=encoder.encode(event))
    assert producer.flush(30) == 0

    running = Running(settings)
    try:
        wait_for_commit(settings, timeout_s=120, running=running)
        metrics_url = f"http://127.0.0.1:{settings.telemetry.port}/metrics"
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            metrics = response.read().decode()
    finally:
        running.close()
    scores = read_topic(settings, settings.topics.fraud_scores, schemas.FRAUD_SCORE)
    assert len(scores) == len(events)

    captured = capfd.readouterr()
    assert "pipeline_stopped" in captured.out + captured.err  # the logs were captured
    for text in (captured.out, captured.err, metrics, repr(settings), str(settings)):
        assert PASSWORD not in text


def test_a_wrong_password_fails_fast_and_says_so(secure_broker, model_dir, tmp_path):
    bootstrap, ca = secure_broker
    password_file = tmp_path / "password"
    password_file.write_text("not-the-password")
    settings = secure_settings(bootstrap, ca, model_dir, password_file)
    started = time.monotonic()
    with pytest.raises(
        KafkaConnectionError, match=r"refused the connection \(SASL_SSL\).*[Aa]uthentication"
    ):
        ensure_changelog(settings)
    assert time.monotonic() - started < 20

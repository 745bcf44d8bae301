"""Encodes results and dead letters and produces them, with the state changelog records;
delivery failures are collected so no input is committed whose outputs were not acknowledged,
and each stretch of records counts its unacknowledged ones, so a checkpoint can tell when a
stretch is safe without waiting for all later ones (`Unacked`).

Scores and recommendations go to the partition of their input (modulo the output topic's
partitions), so a batch knows where each record goes, and only the last record a batch
writes to each output partition asks for a delivery report (a callback per record cost
1.9 µs a record in a microbenchmark, 0.5–0.8 µs an event in the loop's produce stage); the
same holds for the changelog records a stretch writes to each changelog partition.
That one report vouches for the batch's earlier records of its partition because the
at-least-once producer keeps them in order and cannot lose one alone
(`AT_LEAST_ONCE_PRODUCER`).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from confluent_kafka import KafkaError, KafkaException, Message, Producer

import schemas
from pipeline.serve.encode import Encoded
from pipeline.serve.features import feature_digests
from pipeline.serve.records import DeadLetter, EventColumns, FeatureBatch, Rejected, Scored
from pipeline.serve.state.changes import StateChange
from pipeline.serve.state.pseudonym import Pseudonyms
from pipeline.settings import ProcessingSettings, TopicSettings
from schemas.codec import Encoder
from schemas.errors import StreamscoreError

# An acknowledged record vouches for the earlier records of its partition only if none of
# them can fail alone. The idempotent producer keeps a partition's records in order;
# gapless makes any failure that would leave a gap behind a later record fatal, which fails
# every record after it too; and no record times out (librdkafka leaves timeouts out of
# the gapless guarantee): through an outage records wait, and backpressure pauses the input.
AT_LEAST_ONCE_PRODUCER: dict[str, str | int | float | bool] = {
    "enable.gapless.guarantee": True,
    "message.timeout.ms": 0,
}
FEATURES_HEADER = "streamscore-features"
TIMING_HEADER = "streamscore-timing"
Headers = list[tuple[str, str | bytes | None]]


class DeliveryError(StreamscoreError, RuntimeError):
    """Outputs were not acknowledged; the inputs behind them must not be committed."""


def debug_headers(
    processing: ProcessingSettings,
    ingest_time: np.ndarray,
    features: FeatureBatch,
    started_ms: float,
    seconds: tuple[float, float, float],
) -> list[Headers] | None:
    """Per scored row, when turned on: the features digest, and the latency breakdown.

    Timing: `queue_ms` from the input's Kafka timestamp (`ingest_time`, per scored row) to
    the batch starting (`started_ms`), then the batch's decode, features and inference (the
    engines alone) `seconds`; the rest, up to the output's own Kafka timestamp, is waiting
    for the inference thread, shaping the records, encode and produce.
    """
    if not (processing.emit_features or processing.emit_timing):
        return None
    ingest = ingest_time.tolist()
    headers: list[Headers] = [[] for _ in ingest]
    if processing.emit_features:
        for row, digest in zip(headers, feature_digests(features), strict=True):
            row.append((FEATURES_HEADER, digest))
    if processing.emit_timing:
        decode, feats, infer = (round(part * 1000, 3) for part in seconds)
        for row, ingested in zip(headers, ingest, strict=True):
            timing = {
                "queue_ms": round(started_ms - ingested, 3),
                "decode_ms": decode,
                "features_ms": feats,
                "inference_ms": infer,
            }
            row.append((TIMING_HEADER, json.dumps(timing)))
    return headers


def dead_letter(
    message: Message, rejected: Rejected, redact: Pseudonyms | None = None
) -> DeadLetter:
    """The DeadLetter record for an input `message` refused as `rejected`. With `redact`
    (privacy.dead_letter_payload = redact) it keeps only the reason, the source position and
    a keyed hash of the value: no key, no value, no message, which may quote either.
    """
    record = DeadLetter(
        original_key=message.key(),
        original_value=message.value(),
        source_topic=message.topic() or "",
        source_partition=rejected.partition,
        source_offset=rejected.offset,
        error_kind=rejected.kind,
        error_message=rejected.detail,
        failed_time=int(time.time() * 1000),
        payload_hash=None,
    )
    if redact is not None:
        record["payload_hash"] = redact.digest(message.value() or b"")
        record["original_key"] = record["original_value"] = None
        record["error_message"] = ""
    return record


def last_of_each(partitions: np.ndarray) -> list[bool]:
    """For each record, whether it is the last of its partition in `partitions`: the
    records that ask for a delivery report (the module's docstring says why that suffices).
    """
    last = np.zeros(len(partitions), dtype=np.bool_)
    _, index = np.unique(partitions[::-1], return_index=True)
    last[len(partitions) - 1 - index] = True
    result: list[bool] = last.tolist()
    return result


class Unacked:
    """Records of one stretch (the outputs between two checkpoints, or one batch of changelog
    records) still awaiting acknowledgement. Its `delivered` is their delivery callback, so
    counting costs one bound method per stretch, not one closure per record.
    """

    __slots__ = ("_failures", "count")

    def __init__(self, failures: list[str]) -> None:
        """Count from zero; failed deliveries are appended to the sink's `failures`."""
        self.count = 0
        self._failures = failures

    def delivered(self, error: KafkaError | None, message: Message) -> None:
        """Delivery callback: one record fewer awaits; remember it if it failed."""
        self.count -= 1
        if error is not None:
            self._failures.append(f"{message.topic()}: {error}")


class Sink:
    """Produces FraudScore, Recommendation and DeadLetter records, keyed by user id, and
    changelog records to the changelog partition of their input partition.
    """

    def __init__(
        self,
        producer: Producer,
        topics: TopicSettings,
        changelog: str,
        partitions: Mapping[str, int],
        dead_letter_id: int | None = None,
        track: bool = True,
    ) -> None:
        """Write to the topics named in `topics` and to `changelog` through `producer`;
        `partitions` holds the partition count of each score and recommendation topic.
        Dead letters are framed with `dead_letter_id` (default: the static catalog's).

        `track`: count acknowledgements with delivery callbacks, which is how at-least-once
        knows a stretch is safe; its producer must be configured with
        `AT_LEAST_ONCE_PRODUCER`. Exactly-once passes False: a transaction's commit fails if
        any of its records failed. Untracked, the `Unacked` counts only grow, and nothing
        reads them.
        """
        self._track = track
        self._producer = producer
        self._topics = topics
        self._partitions = dict(partitions)
        self._changelog = changelog
        self._dead_letter = Encoder(schemas.DEAD_LETTER, dead_letter_id)
        self._failures: list[str] = []
        self._outputs = Unacked(self._failures)

    def publish(
        self,
        columns: EventColumns,
        scored: Scored,
        encoded: Encoded,
        dead_letters: list[DeadLetter],
        headers: list[Headers] | None = None,
    ) -> None:
        """Queue every output of a batch; deliveries are confirmed at the next flush.
        `headers` (debug outputs), one list per scored row, go on its fraud score and
        recommendation. Each output is keyed by its input's key (the user id).
        """
        keys = columns.keys
        rows = scored.rows.tolist()
        ranked = scored.ranked.tolist()
        sources = columns.partition[scored.rows]
        self._produce_all(
            self._topics.fraud_scores,
            [keys[row] for row in rows],
            sources,
            encoded.fraud,
            encoded.fraud_starts,
            headers,
        )
        self._produce_all(
            self._topics.recommendations,
            [keys[rows[i]] for i in ranked],
            sources[scored.ranked],
            encoded.recommendations,
            encoded.recommendation_starts,
            None if headers is None else [headers[i] for i in ranked],
        )
        if scored.shadow is not None:
            self._produce_all(
                self._topics.shadow_scores,
                [keys[row] for row in rows],
                sources,
                encoded.shadow,
                encoded.shadow_starts,
                None,
            )
        for record in dead_letters:
            key = record["original_key"]
            self._produce(self._topics.dead_letter, key, self._dead_letter.encode(record))
        self._producer.poll(0)

    def publish_records(self, topic: str, records: list[tuple[bytes, bytes]]) -> None:
        """Queue encoded (key, value) records to `topic`, acknowledged with the outputs."""
        for key, value in records:
            self._produce(topic, key, value)

    def publish_state(self, changes: Sequence[StateChange], to: Unacked | None = None) -> Unacked:
        """Queue changelog records: a user's state bytes, or a tombstone for an eviction.
        Returns the count of them still awaiting acknowledgement: `to`, counting on, when
        given (the chunks of one stretch). As with the outputs, only each changelog
        partition's last record asks for a delivery report (the module's docstring says why
        that suffices): a report per record cost about 1 µs more a record (3.66 against 2.68
        µs of CPU a record, 50,000 records to 12 partitions, six runs each, in a slow hour),
        and a stretch writes about one record per user it changed.
        """
        unacked = Unacked(self._failures) if to is None else to
        produce, topic = self._producer.produce, self._changelog
        delivered = unacked.delivered if self._track else None
        records = list(changes)  # walked twice; a `StateChanges` makes records on each read
        partitions = np.fromiter((change[0] for change in records), np.int64, len(records))
        reports = last_of_each(partitions)
        queued = 0
        for (partition, key, value), report in zip(records, reports, strict=True):
            try:  # as `_produce_all`
                if report:
                    produce(topic, value, key, partition, delivered)
                    queued += 1
                else:
                    produce(topic, value, key, partition)
            except BufferError:  # local queue full: the slow path serves, retries and counts
                unacked.count += queued
                queued = 0
                self._produce(topic, key, value, partition=partition, to=unacked)
        unacked.count += queued
        self._producer.poll(0)
        return unacked

    def take_outputs(self) -> Unacked:
        """The count of outputs published so far still awaiting acknowledgement; outputs
        published from now on are counted afresh.
        """
        outputs, self._outputs = self._outputs, Unacked(self._failures)
        return outputs

    def serve(self) -> None:
        """Run the delivery callbacks of records acknowledged since the last call."""
        self._producer.poll(0)

    def send_now(self, timeout_s: float) -> None:
        """Send what is queued without waiting out `linger.ms`, and run the delivery
        callbacks of what is acknowledged within `timeout_s` (librdkafka sends at once only
        while a flush is under way, so this is a flush that may time out). The client takes
        whole milliseconds: below 1 ms the flush is over before its broker thread wakes, and
        nothing is sent early (rd_kafka_flush).
        """
        self._producer.flush(timeout_s)

    def in_flight(self) -> int:
        """Records queued or in transit, not yet acknowledged."""
        return len(self._producer)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued output is acknowledged; raise DeliveryError otherwise."""
        remaining = self._producer.flush(timeout_s)
        self.raise_failures()
        if remaining:
            raise DeliveryError(f"{remaining} outputs still unacknowledged after {timeout_s}s")

    def close(self, timeout_s: float = 10.0) -> None:
        """Release the producer: wait up to `timeout_s` for what is queued, drop the rest
        (inputs behind unacknowledged outputs are never committed, so they are read again),
        then destroy the client so that its threads stop and it stops calling a broker
        that may be gone. `Producer.close` alone flushes without a timeout. A producer in
        a fatal state (fenced) raises from flush and purge: it is closed all the same.
        """
        with contextlib.suppress(KafkaException):
            self._producer.flush(timeout_s)
        with contextlib.suppress(KafkaException):
            self._producer.purge()
        with warnings.catch_warnings():  # what close() could not flush was dropped on purpose
            warnings.simplefilter("ignore", RuntimeWarning)
            self._producer.close()

    def raise_failures(self) -> None:
        """Raise DeliveryError if any output failed delivery since the last check."""
        if self._failures:
            failures = list(self._failures)
            self._failures.clear()  # in place: every Unacked appends to this list
            raise DeliveryError(f"{len(failures)} outputs failed delivery, first: {failures[0]}")

    def _produce_all(
        self,
        topic: str,
        keys: list[bytes | None],
        sources: np.ndarray,
        data: bytes,
        starts: list[int],
        headers: list[Headers] | None,
    ) -> None:
        """One produce() per record of `data`, to its input's partition (`sources`) modulo
        the topic's: the loop confluent-kafka's API leaves us. Only each partition's last
        record asks for a delivery report (the module's docstring says why that suffices).
        Without headers (they are for debugging) it passes every argument by position:
        a keyword costs the call about 330 ns (1,270 against 940 ns a record, measured).
        """
        partitions = sources % self._partitions[topic]
        places, reports = partitions.tolist(), last_of_each(partitions)
        if headers is not None:
            for i, key in enumerate(keys):
                self._produce(topic, key, data[starts[i] : starts[i + 1]], headers[i], places[i])
            return
        produce, unacked = self._producer.produce, self._outputs
        delivered = unacked.delivered if self._track else None
        queued = 0
        records = zip(keys, starts, starts[1:], places, reports, strict=False)
        for key, start, end, partition, report in records:
            try:
                # (topic, value, key, partition, on_delivery): confluent-kafka's order.
                if report:
                    produce(topic, data[start:end], key, partition, delivered)
                    queued += 1
                else:
                    produce(topic, data[start:end], key, partition)
            except BufferError:  # local queue full: the slow path serves, retries and counts
                unacked.count += queued  # before serving runs their delivery callbacks
                queued = 0
                self._produce(topic, key, data[start:end], partition=partition)
        unacked.count += queued

    def _produce(
        self,
        topic: str,
        key: str | bytes | None,
        value: bytes | None,
        headers: Headers | None = None,
        partition: int = -1,
        to: Unacked | None = None,
    ) -> None:
        unacked = self._outputs if to is None else to
        while True:
            try:
                self._producer.produce(
                    topic,
                    value=value,
                    key=key,
                    headers=headers,
                    partition=partition,
                    on_delivery=unacked.delivered if self._track else None,
                )
                unacked.count += 1
                return
            except BufferError:  # local queue full: serve delivery reports, then retry
                self._producer.poll(0.05)

"""Frozen, typed settings: read once at start from a TOML file and the environment.

Precedence, highest first: constructor arguments (the CLI), `STREAMSCORE_*` environment
variables (nested with `__`, e.g. `STREAMSCORE_CONSUMER__MAX_BATCH=1000`), the TOML file named
by `--config` or `STREAMSCORE_CONFIG`, then the defaults below. `KAFKA_BOOTSTRAP_SERVERS`, when
set, names an existing cluster, and `SCHEMA_REGISTRY_URL` an existing registry (empty: the
static catalog). A bad value fails at start with the dotted setting name.
"""

from __future__ import annotations

import json
import os
import secrets
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from engines.settings import EngineSettings
from schemas.errors import StreamscoreError

CONFIG_ENV = "STREAMSCORE_CONFIG"
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
MIN_SECRET_BYTES = 16  # a pseudonym key: 128 bits at least


class SettingsError(StreamscoreError, ValueError):
    """A setting is invalid; the message names it."""


def _one_secret_source(name: str, value: SecretStr | None, path: Path | None) -> None:
    """A secret comes from the setting `name` or from the file `<name>_file`, not both; the
    file must exist.
    """
    if value is not None and path is not None:
        raise ValueError(f"set {name} or {name}_file, not both")
    if path is not None and not path.is_file():
        raise ValueError(f"{name}_file {path} does not exist")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SecurityProtocol(StrEnum):
    """librdkafka `security.protocol` values."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class KafkaSettings(_Frozen):
    """Connection settings shared by every client: consumer, producer and admin."""

    bootstrap_servers: str = DEFAULT_BOOTSTRAP
    client_id: str = "streamscore"
    security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = Field(
        default=None, description="Read the SASL password from this file (a mounted Secret)."
    )
    ssl_ca_location: Path | None = None
    extra: dict[str, str] = Field(
        default_factory=dict, description="Further librdkafka properties, passed as they are."
    )

    @model_validator(mode="after")
    def _one_password_source(self) -> Self:
        _one_secret_source("sasl_password", self.sasl_password, self.sasl_password_file)
        return self

    def client_config(self) -> dict[str, str | int | float | bool]:
        """The librdkafka dotted keys common to every client (secrets revealed here only)."""
        config: dict[str, str | int | float | bool] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol.value,
        }
        if self.sasl_mechanism:
            config["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            config["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            config["sasl.password"] = self.sasl_password.get_secret_value()
        elif self.sasl_password_file is not None:
            config["sasl.password"] = self.sasl_password_file.read_text().strip()
        if self.ssl_ca_location is not None:
            config["ssl.ca.location"] = str(self.ssl_ca_location)
        return config | self.extra


DEFAULT_REGISTRY_URL = "http://127.0.0.1:8081/apis/ccompat/v7"


class SchemaRegistrySettings(_Frozen):
    """The Confluent-compatible schema registry that assigns wire ids (`make demo` and the
    tests start Apicurio on the default URL). An empty `url` is the static mode: ids come
    from the fixed catalog in `schemas`, for a deployment without a registry.
    """

    url: str = Field(
        default=DEFAULT_REGISTRY_URL,
        description="Base URL of the Confluent API (Apicurio: `.../apis/ccompat/v7`); "
        "empty for the static catalog.",
    )
    basic_auth_user: str | None = None
    basic_auth_password: SecretStr | None = None
    basic_auth_password_file: Path | None = Field(
        default=None, description="Read the basic-auth password from this file (a Secret)."
    )
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    timeout_s: PositiveFloat = Field(
        default=5.0, description="Per request: the client's own default is no timeout."
    )
    retry_backoff_s: PositiveFloat = Field(
        default=1.0, description="First wait after the registry did not answer; doubles."
    )
    retry_backoff_max_s: PositiveFloat = 30.0
    startup_timeout_s: PositiveFloat = Field(
        default=120.0, description="How long start-up retries registering the output schemas."
    )
    compatibility: Literal[
        "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL",
        "FULL_TRANSITIVE", "NONE",
    ] = "BACKWARD"  # fmt: skip

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _one_secret_source(
            "basic_auth_password", self.basic_auth_password, self.basic_auth_password_file
        )
        has_password = self.basic_auth_password or self.basic_auth_password_file
        if bool(self.basic_auth_user) != bool(has_password):
            raise ValueError("basic_auth_user and a basic-auth password go together")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r} is not an http(s) URL")
        return self

    @property
    def enabled(self) -> bool:
        """False in the static mode."""
        return bool(self.url)

    def client_config(self) -> dict[str, Any]:
        """`SchemaRegistryClient` configuration (the password revealed here only). The
        client retries once; longer outages are the pipeline's to wait out.
        """
        config: dict[str, Any] = {
            "url": self.url,
            "timeout": self.timeout_s,
            "max.retries": 1,
            "retries.wait.ms": 200,
            "retries.max.wait.ms": 1000,
        }
        password = None
        if self.basic_auth_password is not None:
            password = self.basic_auth_password.get_secret_value()
        elif self.basic_auth_password_file is not None:
            password = self.basic_auth_password_file.read_text().strip()
        if self.basic_auth_user and password is not None:
            config["basic.auth.user.info"] = f"{self.basic_auth_user}:{password}"
        for key, path in (
            ("ssl.ca.location", self.ssl_ca_location),
            ("ssl.certificate.location", self.ssl_certificate_location),
            ("ssl.key.location", self.ssl_key_location),
        ):
            if path is not None:
                config[key] = str(path)
        return config


class TopicSettings(_Frozen):
    """Topic names and the layout `streamscore topics create` gives new topics."""

    input: str = "clickstream"
    fraud_scores: str = "fraud-scores"
    recommendations: str = "recommendations"
    dead_letter: str = "clickstream-dlq"
    labels: str = "clickstream-labels"
    changelog: str | None = Field(
        default=None,
        description="Compacted state changelog; default `<group_id>.<input>.changelog`.",
    )
    forget: str = Field(
        default="streamscore-forget",
        description="Erasure requests (`streamscore forget`), one partition, read by every "
        "instance.",
    )
    model_quality: str = Field(
        default="model-quality",
        description="`streamscore monitor`'s record per model version and report interval.",
    )
    shadow_scores: str = Field(
        default="fraud-scores-shadow",
        description="FraudScore records of the challenger being shadow-scored (engine.shadow): "
        "read by the monitor, never a decision.",
    )
    input_histograms: str = Field(
        default="model-input-histograms",
        description="Each pipeline instance's counts of the fraud model's inputs and scores "
        "in the drift bins of the serving version, for the monitor's PSI.",
    )
    partitions: PositiveInt = 4
    replication_factor: PositiveInt = 1
    dead_letter_retention_ms: PositiveInt = Field(
        default=7 * 24 * 3600 * 1000,
        description="`retention.ms` a new dead-letter topic gets: how long rejected payloads "
        "(personal data included) stay for a producer to fix and replay.",
    )
    forget_retention_ms: PositiveInt = Field(
        default=30 * 24 * 3600 * 1000,
        description="`retention.ms` of a new forget topic; longer than the pipeline is ever "
        "stopped, or a request made meanwhile is not applied.",
    )


class ConsumerSettings(_Frozen):
    """The consumer group and how micro-batches are taken."""

    group_id: str = "streamscore"
    instance_id: str | None = Field(
        default=None,
        description="Static membership (`group.instance.id`): a restart within the session "
        "timeout keeps its partitions without a rebalance.",
    )
    max_batch: PositiveInt = Field(
        default=2000,
        description="A micro-batch takes at most this many fetched events. It reaches this "
        "only under a backlog (a batch never waits to fill), where a batch's fixed cost "
        "(array set-up, engine calls: about 1 ms) spread over more events drains the lag "
        "faster: 97-116k events/s at 2000 against 73-86k at 500, one process on the 2-core "
        "bench machine. A full batch takes about 20 ms there; lower it for a tighter "
        "latency SLO under load.",
    )
    max_wait_ms: PositiveInt = Field(
        default=5,
        description="With nothing fetched, how long the loop waits for a first event (a "
        "batch never waits to fill: `consume.take_batch`); also the broker's "
        "fetch.wait.max.ms, so at live rates about one batch a max_wait_ms, and below "
        "fetch_min_bytes a max_wait_ms the event waits for its fetch: the largest part of "
        "the latency at low rates. Under load fetches fill first and it does not matter. At "
        "10,000 events/s on the 2-core bench machine (AMD EPYC, broker beside it), 5, 10 "
        "and 20 gave p99 21.8-25.2, 28.3 and 37.2-38.0 ms, for the process 38-44%, 31% and "
        "21% of a core and the broker 48-52%, 39% and 31% (more, smaller batches, each "
        "with its fixed cost, and more fetches: an idle consumer asks each broker for one "
        "1000 / max_wait_ms times a second). Raise it to trade latency for CPU at low "
        "rates; on a machine 3-4x slower, whose two cores the broker saturated, 5 made p99 "
        "worse than 20 (docs/operations.md).",
    )
    fetch_min_bytes: PositiveInt = Field(
        default=65_536,
        description="The broker holds a fetch until this many bytes arrived or max_wait_ms "
        "passed. With 1 byte a consumer of a steady stream fetches once per round trip "
        "(about 2,900 fetches/s and 80% of a broker core at 4,000 events/s, measured); "
        "above the bytes one max_wait_ms brings, once per max_wait_ms.",
    )
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: PositiveInt = 45_000
    heartbeat_interval_ms: PositiveInt = Field(
        default=1000,
        description="`heartbeat.interval.ms`: members learn of a rebalance at their next "
        "heartbeat, and a cooperative rebalance takes two rounds, so a replica joining "
        "(a KEDA scale-out) gets its partitions after about two intervals: two processes "
        "starting together held their final assignment 6.5 s after their first log line at "
        "librdkafka's 3000, 2.5 s at 1000 (measured). One heartbeat a second per member is "
        "little for the coordinator. At most a third of session_timeout_ms.",
    )
    max_poll_interval_ms: PositiveInt = 300_000

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> Self:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                "heartbeat_interval_ms must be at most a third of session_timeout_ms: a "
                "member missing a few heartbeats would be expelled from the group"
            )
        return self


class CheckpointSettings(_Frozen):
    """How often outputs are flushed and input offsets committed (at-least-once)."""

    interval_ms: PositiveInt = 1000


class ProcessingSettings(_Frozen):
    """Delivery guarantee, backpressure and debug outputs.

    `at_least_once`: outputs and changelog records are acknowledged before input offsets
    are committed. `exactly_once`: one transaction holds the outputs, the changelog records
    and the input offsets of the batches of `transaction_interval_ms`; read outputs with
    `isolation.level=read_committed`.
    """

    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    transaction_interval_ms: Annotated[int, Field(ge=0)] = Field(
        default=100,
        description="exactly_once: a transaction holds the batches of this long (0: one "
        "batch). A commit costs the same whatever it holds; read_committed readers see the "
        "outputs at commit, so this adds up to its length to their latency.",
    )
    transaction_timeout_ms: PositiveInt = Field(
        default=10_000,
        description="A crashed process's open transaction blocks read_committed readers this "
        "long, unless a restart with the same consumer.instance_id aborts it at once.",
    )
    transaction_call_timeout_ms: PositiveInt = Field(
        default=30_000,
        description="exactly_once: the bound on each transactional call with its retries "
        "(commit, abort, send offsets, a new producer's init). A commit still failing then "
        "is aborted and its input rewound; an abort that fails replaces the producer; a "
        "producer that cannot be initialised stops the process (exit code 3) for its "
        "supervisor to restart. Longer than a broker failover (about 12 s with the "
        "broker's default session timeout), shorter than telemetry.liveness_timeout_s.",
    )
    max_in_flight: PositiveInt = Field(
        default=100_000,
        description="Outputs queued but not yet acknowledged before input partitions pause.",
    )
    inference_depth: Annotated[int, Field(ge=0, le=8)] = Field(
        default=1,
        description="Batches whose inference runs on the inference thread while the loop "
        "prepares the next (a bounded FIFO; outputs and commits stay in input order); 0 "
        "runs inference on the loop's thread.",
    )
    emit_features: bool = Field(
        default=False,
        description="Debug: put a digest of each event's features in a header of its outputs.",
    )
    emit_timing: bool = Field(
        default=False,
        description="Debug: put each event's latency breakdown in a header of its outputs.",
    )

    @model_validator(mode="after")
    def _transaction_fits(self) -> Self:
        if self.transaction_interval_ms * 2 > self.transaction_timeout_ms:
            raise ValueError(
                "transaction_interval_ms must be at most half of transaction_timeout_ms: the "
                "broker aborts a transaction open longer than its timeout"
            )
        return self


class PrivacySettings(_Frozen):
    """The pseudonym key and what the dead-letter topic keeps.

    The key (a secret, like the Kafka password: the environment or a mounted file) keys the
    pseudonyms state keeps of device ids, IPs, cards and countries. The pipeline does not
    start without one.
    """

    pseudonym_key: SecretStr | None = None
    pseudonym_key_file: Path | None = Field(
        default=None, description="Read the pseudonym key from this file (a mounted Secret)."
    )
    dead_letter_payload: Literal["keep", "redact"] = Field(
        default="keep",
        description="`keep`: a dead letter carries the rejected key and value, so a producer "
        "can fix and replay it. `redact`: only the reason, the source position and a keyed "
        "hash of the payload.",
    )

    @model_validator(mode="after")
    def _one_key_source(self) -> Self:
        _one_secret_source("pseudonym_key", self.pseudonym_key, self.pseudonym_key_file)
        return self

    @field_validator("pseudonym_key")
    @classmethod
    def _long_enough(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and len(key.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"shorter than {MIN_SECRET_BYTES} bytes")
        return key

    def secret(self) -> bytes:
        """The pseudonym key's bytes; SettingsError naming the setting if there is none."""
        if self.pseudonym_key is not None:
            return self.pseudonym_key.get_secret_value().encode()
        if self.pseudonym_key_file is None:
            raise SettingsError(
                "privacy.pseudonym_key: not set; set STREAMSCORE_PRIVACY__PSEUDONYM_KEY or "
                "privacy.pseudonym_key_file (`make demo` and the tests generate one)"
            )
        secret = self.pseudonym_key_file.read_bytes().strip()
        if len(secret) < MIN_SECRET_BYTES:
            raise SettingsError(
                f"privacy.pseudonym_key_file: shorter than {MIN_SECRET_BYTES} bytes"
            )
        return secret


class TelemetrySettings(_Frozen):
    """Prometheus metrics and health probes over HTTP."""

    host: str = "0.0.0.0"  # noqa: S104 - probes and scrapes come from outside the pod
    port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=9464, description="/metrics, /healthz, /readyz; 0 turns the server off."
    )
    liveness_timeout_s: PositiveFloat = 120.0
    statistics_interval_ms: PositiveInt = 5000


class FeatureSettings(_Frozen):
    """Per-user state kept by the feature updater."""

    session_gap_s: PositiveFloat = 1800.0
    history_length: PositiveInt = 50
    allowed_lateness_s: Annotated[float, Field(ge=0)] = Field(
        default=3600.0,
        description="An event further behind its user's newest is scored but not folded in.",
    )
    ttl_s: PositiveFloat = Field(
        default=7 * 24 * 3600.0, description="Users idle this long in event time are evicted."
    )
    max_users: PositiveInt = Field(
        default=1_000_000, description="Users held per process; the least recent go first."
    )
    restore_batch: PositiveInt = 10_000
    snapshot_dir: Path | None = Field(
        default=None,
        description="Where partitions given up cleanly leave a snapshot of their state, so "
        "that their next owner on this host restores from it and the changelog's tail "
        "(`pipeline/serve/state/snapshot.py`). Unset: every restore reads the whole "
        "changelog.",
    )
    snapshot_max_bytes: PositiveInt = Field(
        default=2 * 1024**3,
        description="After each snapshot is written, the oldest go until the directory holds "
        "at most this many bytes (keep it under the volume's size).",
    )
    snapshot_max_age_s: Annotated[float, Field(gt=0, le=86_400)] = Field(
        default=3600.0,
        description="An older snapshot is deleted, not loaded. At most 24 h, the changelog's "
        "delete.retention.ms: past it, compaction may have removed a tombstone (an eviction "
        "or an erasure) that the snapshot's tail must apply.",
    )


class LimitSettings(_Frozen):
    """Input limits enforced before any work; events over them are dead-lettered."""

    max_payload_bytes: PositiveInt = 16_384
    max_string_length: PositiveInt = 512
    max_candidates: PositiveInt = 200
    max_quantity: PositiveInt = 1000
    max_price: PositiveFloat = 1_000_000.0
    max_future_skew_s: PositiveFloat = 600.0
    max_event_age_s: PositiveFloat = 30 * 24 * 3600.0


class ProduceSettings(_Frozen):
    """How `streamscore produce --rate` stamps events, as a live shop's arrive: event time is
    the wall clock less a delivery delay, and a few events arrive hours late (an app that was
    offline), past `features.allowed_lateness_s`, so a live run meets the late-event rule.
    """

    delay_mean_ms: Annotated[float, Field(ge=0)] = Field(
        default=150.0, description="Mean of the exponential delay from event to produce."
    )
    late_fraction: Annotated[float, Field(ge=0, le=1)] = 0.002
    late_min_s: PositiveFloat = 3900.0
    late_max_s: PositiveFloat = 4 * 3600.0

    @model_validator(mode="after")
    def _late_range(self) -> Self:
        if self.late_min_s > self.late_max_s:
            raise ValueError("late_min_s must not exceed late_max_s")
        return self


class MonitorSettings(_Frozen):
    """`streamscore monitor`: joins delayed labels to the fraud scores served and reports
    online quality per model version.
    """

    group_id: str = Field(
        default="streamscore-monitor",
        description="The group the monitor commits its read positions under; its pending "
        "joins are kept in the compacted topic `<group_id>.changelog`.",
    )
    join_window_s: PositiveFloat = Field(
        default=7 * 24 * 3600.0,
        description="How long a score waits for its label (and a label for its score), "
        "from when it was served (or labelled).",
    )
    max_pending: PositiveInt = Field(
        default=2_000_000,
        description="Scores (and labels) waiting at most, each side; beyond it the oldest "
        "leave, counted unjoined.",
    )
    quality_window_s: PositiveFloat = Field(
        default=3600.0, description="Quality figures cover the labels of this last stretch."
    )
    histogram_interval_s: PositiveFloat = Field(
        default=10.0,
        description="How often each pipeline instance publishes its input histograms "
        "(topics.input_histograms).",
    )
    report_interval_s: PositiveFloat = Field(
        default=30.0,
        description="How often figures are reported and, in one transaction, pending joins "
        "and read positions saved.",
    )

    promote: bool = Field(
        default=False,
        description="Promote the challenger when, over the window, it beats the champion "
        "on the same labels by promote_margin_pr_auc and promote_margin_recall with at "
        "least promote_min_labels each (the monitor then writes engine.model_dir).",
    )
    promote_min_labels: PositiveInt = Field(
        default=1000, description="Labelled events each side needs before a verdict."
    )
    promote_margin_pr_auc: Annotated[float, Field(ge=0, le=1)] = 0.02
    promote_margin_recall: Annotated[float, Field(ge=0, le=1)] = 0.02

    @model_validator(mode="after")
    def _report_within_window(self) -> Self:
        if self.report_interval_s > self.quality_window_s:
            raise ValueError(
                f"monitor.report_interval_s ({self.report_interval_s:g}) must not exceed "
                f"monitor.quality_window_s ({self.quality_window_s:g})"
            )
        return self


class DecisionSettings(_Frozen):
    """Fraud score thresholds: below review allows, at or above block blocks."""

    review_threshold: Annotated[float, Field(ge=0, le=1)] = 0.5
    block_threshold: Annotated[float, Field(ge=0, le=1)] = 0.9
    top_reasons: Annotated[int, Field(ge=0)] = 3

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.review_threshold > self.block_threshold:
            raise ValueError("review_threshold must not exceed block_threshold")
        return self


class RankingSettings(_Frozen):
    """How many ranked candidates each Recommendation carries."""

    top_k: PositiveInt = 10


class Settings(BaseSettings):
    """Everything streamscore reads at start."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix="STREAMSCORE_",
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    schema_registry: SchemaRegistrySettings = SchemaRegistrySettings()
    topics: TopicSettings = TopicSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    processing: ProcessingSettings = ProcessingSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    privacy: PrivacySettings = PrivacySettings()
    features: FeatureSettings = FeatureSettings()
    limits: LimitSettings = LimitSettings()
    produce: ProduceSettings = ProduceSettings()
    monitor: MonitorSettings = MonitorSettings()
    engine: EngineSettings = EngineSettings()
    decision: DecisionSettings = DecisionSettings()
    ranking: RankingSettings = RankingSettings()
    log_format: Literal["auto", "json", "console"] = "auto"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Order: CLI arguments, environment, TOML file, defaults."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)


def settings_env(settings: Settings) -> dict[str, str]:
    """`settings` as STREAMSCORE_* variables (a JSON object per section), so a child process
    reads exactly these settings.
    """
    env = {}
    for section, value in settings.model_dump(mode="json").items():
        if section == "kafka" and settings.kafka.sasl_password is not None:
            value["sasl_password"] = settings.kafka.sasl_password.get_secret_value()
        registry_password = settings.schema_registry.basic_auth_password
        if section == "schema_registry" and registry_password is not None:
            value["basic_auth_password"] = registry_password.get_secret_value()
        if section == "privacy" and settings.privacy.pseudonym_key is not None:
            value["pseudonym_key"] = settings.privacy.pseudonym_key.get_secret_value()
        env[f"STREAMSCORE_{section.upper()}"] = (
            value if isinstance(value, str) else json.dumps(value)
        )
    return env


LOCAL_KEY_FILE = Path("var/privacy/pseudonym.key")


def with_local_key(settings: Settings, path: Path = LOCAL_KEY_FILE) -> Settings:
    """`settings`, given a generated pseudonym key file when none is configured: for the
    local tools (demo, soak, bench), never for `streamscore run`. The file is made once,
    readable by its owner only, and reused, so the demo's state stays comparable.
    """
    privacy = settings.privacy
    if privacy.pseudonym_key is not None or privacy.pseudonym_key_file is not None:
        return settings
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another tool made it meanwhile
            pass
        else:
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_urlsafe(32))
    privacy = privacy.model_copy(update={"pseudonym_key_file": path})
    return settings.model_copy(update={"privacy": privacy})


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read and validate settings once; raise SettingsError naming each bad setting."""
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    settings_cls = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise SettingsError(f"config file {config_file} does not exist")

        class FileSettings(Settings):
            model_config = SettingsConfigDict(toml_file=config_file)

        settings_cls = FileSettings
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap and "STREAMSCORE_KAFKA__BOOTSTRAP_SERVERS" not in os.environ:
        overrides.setdefault("kafka", {}).setdefault("bootstrap_servers", bootstrap)
    registry = os.environ.get("SCHEMA_REGISTRY_URL")
    if registry is not None and "STREAMSCORE_SCHEMA_REGISTRY__URL" not in os.environ:
        overrides.setdefault("schema_registry", {}).setdefault("url", registry)
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from exc

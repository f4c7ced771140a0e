"""Settings shared by every service; each service extends `ChoreoSettings` with its own."""

from __future__ import annotations

import re
import ssl
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from aiokafka.helpers import create_ssl_context
from pydantic import BeforeValidator, ByteSize, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.topics import Topic
from services.common.loop import EventLoopKind

_SECONDS = re.compile(r"^\s*\d+(\.\d+)?\s*$")


def _seconds_or_iso(raw: Any) -> Any:
    # pydantic reads a bare number as seconds only from JSON, not from an environment string.
    if isinstance(raw, str) and _SECONDS.match(raw):
        return timedelta(seconds=float(raw))
    return raw


Duration = Annotated[timedelta, BeforeValidator(_seconds_or_iso)]
"""A duration setting: seconds (`90`, `0.5`) or ISO 8601 (`PT24H`)."""

# RocksDB reads its table files through the OS page cache, outside the process's memory; its own
# cache holds the memtables, the index and filter blocks and the hottest data blocks.
DEFAULT_STATE_MEMORY_BYTES = 16 * 1024 * 1024

PLACEHOLDER_SECRETS = frozenset({"changethis", "changeme", "secret", "password", ""})

Environment = Literal["dev", "test", "production"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def default_insync_replicas(replication_factor: int) -> int:
    """With three replicas or more, writes go on with one replica lost and are never acknowledged by one alone."""
    return 2 if replication_factor >= 3 else 1


class ChoreoSettings(BaseSettings):
    """Read from `CHOREO_*` environment variables (and `.env`)."""

    model_config = SettingsConfigDict(env_prefix="CHOREO_", env_file=".env", extra="ignore")

    environment: Environment = "dev"
    bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Comma-separated host:port list of the Kafka brokers."
    )
    topic_prefix: str = Field(
        default="", description="Prepended to every topic and group name, so several stacks share a cluster."
    )
    partitions: int = Field(default=6, ge=1, description="Partition count of every order-keyed topic.")
    replication_factor: int = Field(
        default=1, ge=1, description="Replicas of every topic Choreo creates (3 on a cluster of three or more)."
    )
    min_insync_replicas: int | None = Field(
        default=None,
        ge=1,
        description="min.insync.replicas of every topic Choreo creates: how many replicas must have a write "
        "before acks=all acknowledges it. Default 2 when the replication factor is 3 or more, else 1.",
    )
    log_level: str = "INFO"
    event_loop: EventLoopKind = Field(
        default="asyncio", description="`asyncio` (the standard library's loop) or `uvloop` (libuv, in C)."
    )
    health_host: str = Field(
        default="127.0.0.1", description="Interface of the /health endpoint (0.0.0.0 in containers)."
    )
    health_port: int = Field(default=0, ge=0, le=65535, description="Port of the /health endpoint; 0 picks a free one.")
    # 25 ms rather than 50: each of a saga's hops that never goes quiet waits half an interval for its
    # transaction, and at half the flat rate the p99 fell from 378 to 234 ms for 3-4% more CPU a saga at
    # the flat rate (more below it; README, Benchmark, eighth round).
    commit_interval: Duration = Field(
        default=timedelta(milliseconds=25),
        description="Least time between the starts of two transactions of an instance. A record that arrives "
        "after a quiet interval commits at once; under load, the records of one interval share one transaction, "
        "which is what the broker's CPU follows. 0 commits after every poll.",
    )
    paced_reads: bool = Field(
        default=False,
        description="While handled records wait for their commit, read again only when it is due: one read of "
        "everything that arrived per commit interval, instead of one per arrival.",
    )
    held_fetches: bool = Field(
        default=True,
        description="A fetch sent before the commit interval is up is held by the broker until just before "
        "then and answered once, with all that arrived: one fetch per commit instead of one per arrival "
        "(aiokafka consumers only).",
    )
    fetch_max_wait: Duration = Field(
        default=timedelta(milliseconds=100),
        description="Longest time the broker holds a service's fetch for `CHOREO_FETCH_MIN_BYTES` to arrive.",
    )
    fetch_min_bytes: int = Field(
        default=1,
        ge=1,
        description="Bytes a service's fetch waits for (at most `CHOREO_FETCH_MAX_WAIT`) before the broker answers; "
        "more means fewer, fuller fetches and up to that wait more latency per hop.",
    )

    gc_young_threshold: int = Field(
        default=10_000,
        ge=100,
        description="Allocations between two collections of the youngest generation of Python's garbage collector "
        "(Python's default is 700); what start-up made is frozen out of every collection. See "
        "`services/common/garbage.py`.",
    )

    transaction_client: Literal["kip890", "aiokafka", "confluent"] = Field(
        default="kip890",
        description="How the services' transactions are sent: `kip890` (three requests a transaction, as KIP-890's "
        "second version has them, on aiokafka's connections; needs `transaction.version` 2, Kafka 4.0 or later), "
        "`aiokafka` (its producer, five requests a transaction) or `confluent` (librdkafka, the protocol in C).",
    )
    consumer_client: Literal["aiokafka", "confluent"] = Field(
        default="aiokafka",
        description="Client library of the services' input consumers: `aiokafka` (Python) or `confluent` "
        "(librdkafka: fetching and parsing in C, on its own threads).",
    )

    order_retention: Duration = Field(
        default=timedelta(days=7),
        description="How long a finished order is remembered (as a small marker) before its state is deleted; "
        "an order id stays unique for this long. Saga topics keep their records at least this long.",
    )
    audit_retention: Duration = Field(
        default=timedelta(days=30),
        description="How long the audit topic keeps each order's timeline.",
    )
    deadletter_retention: Duration = Field(
        default=timedelta(days=30),
        description="How long the deadletter topic keeps a rejected message for someone to look at.",
    )
    deadletter_max_replays: int = Field(
        default=3,
        ge=1,
        description="How often `choreo deadletter replay` sends a message back before refusing it: a replay "
        "that is dead-lettered again keeps its count.",
    )
    changelog_delete_retention: Duration = Field(
        default=timedelta(days=1),
        description="How long a state changelog keeps a tombstone (its delete.retention.ms); a state store whose "
        "checkpoint is older than this may have missed a deletion and is restored in full.",
    )
    state_dir: Path | None = Field(
        default=None,
        description="Folder of the services' on-disk state stores (one per task); default `<run dir>/state`.",
    )
    state_store: Literal["disk", "memory"] = Field(
        default="disk", description="`disk` (RocksDB, memory capped) or `memory` (a dict; for unit tests)."
    )
    state_memory: ByteSize = Field(
        default=ByteSize(DEFAULT_STATE_MEMORY_BYTES),
        ge=4 * 1024 * 1024,
        description="Memory a service's RocksDB stores share (block cache, index and filter blocks, memtables), "
        "for example `64MiB`; the cache fills to it and stays there.",
    )

    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @model_validator(mode="after")
    def _secrets_are_real_outside_dev(self) -> Self:
        if self.environment == "dev":
            return self
        for name, value in self._secrets().items():
            if value is not None and value.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS:
                raise ValueError(f"{name} is a placeholder; set a real secret when environment={self.environment}")
        return self

    def _secrets(self) -> dict[str, SecretStr | None]:
        """Secrets to check; subclasses add their own."""
        return {"sasl_password": self.sasl_password}

    @model_validator(mode="after")
    def _enough_replicas_for_the_isr(self) -> Self:
        if self.min_insync_replicas is not None and self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"min_insync_replicas ({self.min_insync_replicas}) exceeds replication_factor "
                f"({self.replication_factor}): no write could ever be acknowledged"
            )
        return self

    @property
    def insync_replicas(self) -> int:
        """The min.insync.replicas Choreo's topics get: one replica may be lost without losing availability."""
        if self.min_insync_replicas is not None:
            return self.min_insync_replicas
        return default_insync_replicas(self.replication_factor)

    def topic(self, topic: Topic) -> str:
        return f"{self.topic_prefix}{topic.name}"

    def group(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def kafka_options(self) -> dict[str, Any]:
        """Connection options accepted by every aiokafka client."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = self._ssl_context()
        if self.security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password is not None else None
            )
        return options

    def _ssl_context(self) -> ssl.SSLContext:
        context: ssl.SSLContext = create_ssl_context(
            cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
        )
        return context

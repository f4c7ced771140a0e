"""Factories for aiokafka and librdkafka clients configured from settings; nothing connects at import."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import UnknownTopicOrPartitionError, for_code
from aiokafka.partitioner import murmur2
from confluent_kafka import Consumer as ConfluentConsumer
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException
from confluent_kafka import KafkaError as ConfluentError
from confluent_kafka import Producer as ConfluentProducer
from confluent_kafka import TopicPartition as ConfluentPartition
from confluent_kafka.admin import AdminClient as ConfluentAdmin

from services.common.settings import ChoreoSettings

HASHED_KEYS_KEPT = 65536
# librdkafka's own lines, as records of this logger: unset, it writes them raw to stderr, some at its end.
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")


@functools.lru_cache(maxsize=HASHED_KEYS_KEPT)
def key_hash(key: bytes) -> int:
    """Kafka's murmur2 of `key`, as the default partitioner uses it. Remembered: aiokafka's is pure Python,
    and an order's key comes back at every hop of its saga."""
    hashed: int = murmur2(key)
    return hashed & 0x7FFFFFFF


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for `key`."""
    return key_hash(key) % partitions


def default_partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """aiokafka's `DefaultPartitioner` over the remembered hashes."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[key_hash(key) % len(all_partitions)]


def confluent_options(settings: ChoreoSettings) -> dict[str, Any]:
    """The connection options of `settings` in librdkafka's names, and its log lines routed to logging."""
    options: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "security.protocol": settings.security_protocol,
        "logger": LIBRDKAFKA_LOG,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        tls = {
            "ssl.ca.location": settings.ssl_cafile,
            "ssl.certificate.location": settings.ssl_certfile,
            "ssl.key.location": settings.ssl_keyfile,
        }
        options.update({name: value for name, value in tls.items() if value is not None})
    if settings.security_protocol.startswith("SASL"):
        options["sasl.mechanism"] = settings.sasl_mechanism or "PLAIN"
        options["sasl.username"] = settings.sasl_username
        options["sasl.password"] = settings.sasl_password.get_secret_value() if settings.sasl_password else None
    return options


# How long to wait for a transaction still committing a group's offsets.
SETTLED_OFFSETS_TIMEOUT_S = 60.0
UNSTABLE_RETRY_S = 0.05


async def offsets_settled(
    settings: ChoreoSettings,
    group_id: str,
    partitions: Sequence[TopicPartition],
    timeout_s: float = SETTLED_OFFSETS_TIMEOUT_S,
) -> None:
    """Return once no transaction is still committing `group_id`'s offsets of `partitions`; raise
    `KafkaException` if one still is after `timeout_s`.

    Until the coordinator has written a taken commit out, a read of the offsets shows those from before
    it, and whoever resumes from them does its work twice. A stable read (require_stable, KIP-447) is
    refused meanwhile. aiokafka's OffsetFetch stops at v3, older than the option, so librdkafka asks;
    only its answer's errors are looked at: it reads an offset's metadata as a C string, past the end of
    one that another client wrote without a terminating NUL.
    """
    admin = ConfluentAdmin(confluent_options(settings))
    asked = [ConfluentPartition(tp.topic, tp.partition) for tp in partitions]
    request = [ConsumerGroupTopicPartitions(group_id, asked)]
    deadline = time.monotonic() + timeout_s

    def unsettled() -> Any:
        try:
            found = admin.list_consumer_group_offsets(request, require_stable=True)[group_id].result()
        except KafkaException as exception:
            error = exception.args[0] if exception.args else None
            if isinstance(error, ConfluentError) and error.code() == ConfluentError.UNSTABLE_OFFSET_COMMIT:
                return error
            raise
        finally:
            admin.poll(0)  # its log lines wait in a queue until served
        return next((tp.error for tp in found.topic_partitions if tp.error is not None), None)

    while (error := await asyncio.to_thread(unsettled)) is not None:
        if time.monotonic() >= deadline:
            raise KafkaException(error)
        await asyncio.sleep(UNSTABLE_RETRY_S)


def admin_client(settings: ChoreoSettings, **overrides: Any) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**{**settings.kafka_options(), "request_timeout_ms": 15_000, **overrides})


def producer(settings: ChoreoSettings, **overrides: Any) -> AIOKafkaProducer:
    # acks=all with idempotence: a retried send never duplicates, an acknowledged one is never lost.
    return AIOKafkaProducer(
        **{
            **settings.kafka_options(),
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 5,
            "partitioner": default_partitioner,
            **overrides,
        }
    )


def consumer(settings: ChoreoSettings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics,
        **{
            **settings.kafka_options(),
            "isolation_level": "read_committed",
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            **overrides,
        },
    )


def confluent_producer(settings: ChoreoSettings, **overrides: Any) -> ConfluentProducer:
    """librdkafka's producer as `producer` makes aiokafka's: acks=all, idempotent, Java's partitioner."""
    return ConfluentProducer(
        {
            **confluent_options(settings),
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            # Java's and aiokafka's partitioner: a keyed record lands where theirs would.
            "partitioner": "murmur2_random",
            **overrides,
        }
    )


def confluent_consumer(settings: ChoreoSettings, group_id: str, **overrides: Any) -> ConfluentConsumer:
    """librdkafka's consumer as `consumer` makes aiokafka's: read_committed, nothing committed on its own."""
    return ConfluentConsumer(
        {
            **confluent_options(settings),
            "group.id": group_id,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            **overrides,
        }
    )


# How long a broker may take to learn a metadata change (a topic created, a configuration altered).
METADATA_WAIT_S = 15.0


async def topic_configs(
    admin: AIOKafkaAdminClient, names: Sequence[str], wait_s: float = METADATA_WAIT_S
) -> dict[str, list[Any]]:
    """Each topic's configuration entries, as DescribeConfigs answers them.

    The admin asks whichever broker it likes; in a cluster, one that has not yet seen a topic just created
    answers "unknown topic", so that answer is asked again for up to `wait_s`.
    """
    deadline = time.monotonic() + wait_s
    while True:
        found: dict[str, list[Any]] = {}
        unknown: list[str] = []
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in names])
        for response in responses:
            for resource in response.resources:
                code, message, _type, name, entries = resource[:5]
                if code == UnknownTopicOrPartitionError.errno and time.monotonic() < deadline:
                    unknown.append(name)
                elif code != 0:
                    raise for_code(code)(f"describing configuration of {name}: {message}")
                else:
                    found[name] = list(entries)
        if not unknown:
            return found
        await asyncio.sleep(0.1)


async def topic_config(admin: AIOKafkaAdminClient, topic: str, key: str) -> str | None:
    """One configuration value of `topic` as the broker reports it (None if the broker has no such key)."""
    entries = (await topic_configs(admin, [topic]))[topic]
    for entry in entries:
        if entry[0] == key:
            value: str = entry[1]
            return value
    return None


async def batches_until(
    consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int], name: str, stall_timeout: float
) -> AsyncIterator[dict[TopicPartition, list[Any]]]:
    """Each batch an assigned, positioned `consumer` reads until it has passed `ends` on every partition.

    Raises TimeoutError when `stall_timeout` seconds pass with no record and no partition done: reading
    `name` has stalled (a broker gone, say), and waiting longer would hang the caller.
    """
    remaining = [tp for tp in ends if await consumer.position(tp) < ends[tp]]
    last_progress = time.monotonic()
    while remaining:
        batch = await consumer.getmany(*remaining, timeout_ms=500)
        yield batch
        still = [tp for tp in remaining if await consumer.position(tp) < ends[tp]]
        if batch or len(still) < len(remaining):
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > stall_timeout:
            raise TimeoutError(f"no progress reading {name} for {stall_timeout:.0f}s")
        remaining = still

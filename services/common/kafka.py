"""Factories for aiokafka clients configured from settings; nothing connects until started."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import for_code
from aiokafka.partitioner import murmur2

from services.common.settings import ChoreoSettings


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for `key`."""
    hashed: int = murmur2(key)
    return (hashed & 0x7FFFFFFF) % partitions


def admin_client(settings: ChoreoSettings, **overrides: Any) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**{**settings.kafka_options(), "request_timeout_ms": 15_000, **overrides})


def producer(settings: ChoreoSettings, **overrides: Any) -> AIOKafkaProducer:
    # acks=all with idempotence: a retried send never duplicates, an acknowledged one is never lost.
    return AIOKafkaProducer(
        **{**settings.kafka_options(), "acks": "all", "enable_idempotence": True, "linger_ms": 5, **overrides}
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


async def topic_config(admin: AIOKafkaAdminClient, topic: str, key: str) -> str | None:
    """One configuration value of `topic` as the broker reports it (None if the broker has no such key)."""
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    for response in responses:
        for resource in response.resources:
            code, message, _type, name, entries = resource[:5]
            if code != 0:
                raise for_code(code)(f"describing configuration of {name}: {message}")
            for entry in entries:
                if entry[0] == key:
                    value: str = entry[1]
                    return value
    return None

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


def confluent_options(settings: ChoreoSettings) -> dict[str, Any]:
    """The connection options of `settings` in librdkafka's names."""
    options: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "security.protocol": settings.security_protocol,
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

"""Provision and inspect the registry's topics on a broker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError, for_code

from schemas.topics import ALL_TOPICS, Topic
from services.common.kafka import admin_client
from services.common.settings import ChoreoSettings

log = logging.getLogger(__name__)

# Shown by `describe` even when the broker reports them at their defaults.
_ALWAYS_SHOWN = ("cleanup.policy", "retention.ms", "min.insync.replicas")
_TOPIC_ALREADY_EXISTS = TopicAlreadyExistsError.errno
METADATA_WAIT_S = 15.0


class TopicConfigurationError(RuntimeError):
    """A topic exists on the broker with settings that contradict the registry."""


@dataclass(frozen=True)
class TopicDescription:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]
    created: bool = False


def expected_partitions(settings: ChoreoSettings, topic: Topic) -> int:
    return settings.partitions


async def ensure_topics(
    settings: ChoreoSettings,
    topics: Sequence[Topic] = ALL_TOPICS,
    config_overrides: dict[str, dict[str, str]] | None = None,
) -> list[TopicDescription]:
    """Create what is missing, then verify every topic against the registry; safe to run again."""
    overrides = config_overrides or {}
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [topic for topic in topics if settings.topic(topic) not in existing]
        if missing:
            await _create(admin, settings, missing, overrides)
        described = await _describe(admin, [settings.topic(topic) for topic in topics])
    finally:
        await admin.close()
    created = {settings.topic(topic) for topic in missing}
    problems = [
        problem
        for topic in topics
        for problem in _mismatches(settings, topic, described[settings.topic(topic)], overrides.get(topic.name, {}))
    ]
    if problems:
        raise TopicConfigurationError("; ".join(problems))
    return [
        TopicDescription(**{**described[settings.topic(topic)].__dict__, "created": settings.topic(topic) in created})
        for topic in topics
    ]


async def describe_topics(settings: ChoreoSettings, topics: Sequence[Topic] = ALL_TOPICS) -> list[TopicDescription]:
    """Partitions and configuration of each topic as the broker reports them; absent topics are skipped."""
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        names = [settings.topic(topic) for topic in topics if settings.topic(topic) in existing]
        described = await _describe(admin, names)
    finally:
        await admin.close()
    return [described[name] for name in names]


async def _create(
    admin: AIOKafkaAdminClient,
    settings: ChoreoSettings,
    topics: Iterable[Topic],
    overrides: dict[str, dict[str, str]],
) -> None:
    requests = [
        NewTopic(
            name=settings.topic(topic),
            num_partitions=expected_partitions(settings, topic),
            replication_factor=settings.replication_factor,
            topic_configs={**topic.config, **overrides.get(topic.name, {})},
        )
        for topic in topics
    ]
    response = await admin.create_topics(requests)
    for name, code, *rest in response.topic_errors:
        if code == _TOPIC_ALREADY_EXISTS:
            # Another process created it between our listing and our request; verification follows.
            log.info("topic %s was created concurrently", name)
        elif code != 0:
            message = rest[0] if rest else ""
            raise for_code(code)(f"creating topic {name}: {message}")
        else:
            log.info("created topic %s", name)


async def _topic_metadata(admin: AIOKafkaAdminClient, names: list[str]) -> list[dict[str, Any]]:
    # A topic just created can take a moment to reach the broker's metadata cache.
    deadline = time.monotonic() + METADATA_WAIT_S
    while True:
        metadata: list[dict[str, Any]] = await admin.describe_topics(names)
        failed = [topic for topic in metadata if topic["error_code"] != 0]
        if not failed:
            return metadata
        retriable = all(topic["error_code"] == UnknownTopicOrPartitionError.errno for topic in failed)
        if not retriable or time.monotonic() > deadline:
            raise for_code(failed[0]["error_code"])(f"describing topic {failed[0]['topic']}")
        await asyncio.sleep(0.1)


async def _describe(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, TopicDescription]:
    if not names:
        return {}
    metadata = await _topic_metadata(admin, names)
    layout: dict[str, tuple[int, int]] = {}
    for topic in metadata:
        partitions = topic["partitions"]
        layout[topic["topic"]] = (len(partitions), len(partitions[0]["replicas"]) if partitions else 0)
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in names])
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            code, message, _type, name, entries = resource[:5]
            if code != 0:
                raise for_code(code)(f"describing configuration of {name}: {message}")
            configs[name] = _shown_config(entries)
    return {
        name: TopicDescription(
            name=name, partitions=layout[name][0], replication_factor=layout[name][1], config=configs[name]
        )
        for name in names
    }


def _shown_config(entries: Iterable[Any]) -> dict[str, str]:
    shown = {}
    for entry in entries:
        key, value, _read_only, is_default = entry[0], entry[1], entry[2], entry[3]
        if key in _ALWAYS_SHOWN or not _is_default(is_default):
            shown[key] = value
    return dict(sorted(shown.items()))


def _is_default(flag_or_source: Any) -> bool:
    # DescribeConfigs v0 answers a boolean `is_default`; v1+ a config source, where 5 means the static default.
    if isinstance(flag_or_source, bool):
        return flag_or_source
    return int(flag_or_source) == 5


def _mismatches(
    settings: ChoreoSettings, topic: Topic, actual: TopicDescription, overrides: dict[str, str]
) -> list[str]:
    problems = []
    for key, wanted in {**topic.config, **overrides}.items():
        found = actual.config.get(key)
        if found != wanted:
            problems.append(f"topic {actual.name} has {key}={found}, the registry requires {wanted}")
    if topic.partitioned_by_order and actual.partitions != expected_partitions(settings, topic):
        problems.append(
            f"topic {actual.name} has {actual.partitions} partitions, co-partitioning requires "
            f"{expected_partitions(settings, topic)} (CHOREO_PARTITIONS)"
        )
    return problems

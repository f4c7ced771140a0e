"""Provision and inspect the registry's topics on a broker.

The registry (`schemas/topics.py`) fixes each topic's cleanup policy. How long records stay depends on the
deployment's settings, so the full configuration is computed here, when the topics are provisioned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, UnknownTopicOrPartitionError, for_code

from schemas.topics import ALL_TOPICS, AUDIT, DEAD_LETTER, MONITOR_ALERTS, Topic
from services.common.kafka import METADATA_WAIT_S, admin_client, consumer, topic_configs
from services.common.settings import ChoreoSettings

log = logging.getLogger(__name__)

# Kafka's own default: a short order retention (tests, drills) never makes saga records go sooner than that.
SAGA_RETENTION_FLOOR = timedelta(days=7)
# An order's records are written while it is in flight, but its state is remembered for `order_retention`
# after it finished: the margin covers the time in flight (the approval deadline is 24 h by default) and
# producers whose clocks are behind the broker's.
SAGA_RETENTION_MARGIN = timedelta(days=1)
# Retention deletes whole segments, so a record can outlive retention.ms by up to segment.ms; Kafka's
# default of 7 days would add a week of disk to every topic.
DELETE_SEGMENT = timedelta(days=1)
# The active segment is never compacted: this bounds how long superseded records and tombstones wait in it.
CHANGELOG_SEGMENT = timedelta(hours=1)
# A quiet changelog never reaches the dirty ratio; this cleans it anyway, so nothing superseded stays long.
CHANGELOG_MAX_COMPACTION_LAG = timedelta(hours=6)
# Cleaning starts once a tenth of the log is superseded (Kafka's default waits for half): a changelog stays
# close to its live size, and since it holds only orders in flight, each pass is cheap.
CHANGELOG_MIN_CLEANABLE_DIRTY_RATIO = "0.1"

_COMPACTION_KEYS = (
    "segment.ms",
    "max.compaction.lag.ms",
    "min.compaction.lag.ms",
    "min.cleanable.dirty.ratio",
    "delete.retention.ms",
)
# Shown by `describe` even when the broker reports them at their defaults.
_ALWAYS_SHOWN = ("cleanup.policy", "min.insync.replicas")
_SHOWN_WITH_DELETE = ("retention.ms", "segment.ms")
_TOPIC_ALREADY_EXISTS = TopicAlreadyExistsError.errno
_DYNAMIC_TOPIC_CONFIG = 1
_DEFAULT_CONFIG = 5
_KAFKA_LONG_MAX = 2**63 - 1
GROUP_COORDINATOR_WAIT_S = 30.0
LEADER_RETRY_MS = 20
OFFSETS_TOPIC = "__consumer_offsets"


class TopicConfigurationError(RuntimeError):
    """A topic exists on the broker with settings that contradict the registry and cannot be changed in place."""


class RetentionSettingsError(ValueError):
    """The retention settings contradict each other; no topic is touched."""


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: str | None
    new: str


@dataclass(frozen=True)
class PartitionPlacement:
    partition: int
    leader: int | None
    replicas: tuple[int, ...]
    isr: tuple[int, ...]

    @property
    def under_replicated(self) -> bool:
        return len(self.isr) < len(self.replicas)


@dataclass(frozen=True)
class TopicDescription:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]
    created: bool = False
    changes: tuple[ConfigChange, ...] = ()
    # Where each partition lives, as the cluster's metadata said when described.
    placement: tuple[PartitionPlacement, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class _Observed:
    description: TopicDescription
    # Every configuration value as the broker applies it, defaults included.
    effective: dict[str, str | None]
    # Only what is set on the topic itself: AlterConfigs resets whatever a request leaves out.
    overrides: dict[str, str]


def expected_partitions(settings: ChoreoSettings, topic: Topic) -> int:
    return settings.partitions


def changelog_delete_retention(settings: ChoreoSettings) -> timedelta:
    """The delete.retention.ms of every state changelog: how long a tombstone stays readable.

    A reader that stopped at some offset sees every deletion written after it if it resumes within this
    time; a local store checkpointed longer ago may have missed one.
    """
    return settings.changelog_delete_retention


def saga_retention(settings: ChoreoSettings) -> timedelta:
    """retention.ms of the saga topics and the internal request/reply topics."""
    return max(SAGA_RETENTION_FLOOR, settings.order_retention + SAGA_RETENTION_MARGIN)


def topic_retention(settings: ChoreoSettings, topic: Topic) -> timedelta:
    """How long a topic with the delete policy keeps a record; raises RetentionSettingsError on bad settings."""
    if topic.name == AUDIT.name:
        if settings.audit_retention < settings.order_retention:
            raise RetentionSettingsError(
                f"CHOREO_AUDIT_RETENTION ({human_duration(settings.audit_retention)}) is shorter than "
                f"CHOREO_ORDER_RETENTION ({human_duration(settings.order_retention)}): the audit must keep an "
                "order's timeline at least as long as the order is remembered"
            )
        return _positive("CHOREO_AUDIT_RETENTION", settings.audit_retention)
    if topic.name == MONITOR_ALERTS.name:
        # Alerts name orders and services whose history is on the audit: kept as long as it.
        return _positive("CHOREO_AUDIT_RETENTION", settings.audit_retention)
    if topic.name == DEAD_LETTER.name:
        return _positive("CHOREO_DEADLETTER_RETENTION", settings.deadletter_retention)
    _positive("CHOREO_ORDER_RETENTION", settings.order_retention)
    return saga_retention(settings)


def wanted_config(settings: ChoreoSettings, topic: Topic) -> dict[str, str]:
    """The configuration `ensure_topics` gives a topic: the registry's policy and the settings' retention."""
    config = dict(topic.config)
    config["min.insync.replicas"] = str(settings.insync_replicas)
    policy = config.get("cleanup.policy", "delete")
    if "delete" in policy:
        config["retention.ms"] = _ms(topic_retention(settings, topic))
        config["segment.ms"] = _ms(DELETE_SEGMENT)
    if "compact" in policy:
        delete_retention = changelog_delete_retention(settings)
        if delete_retention < timedelta(0):
            raise RetentionSettingsError("CHOREO_CHANGELOG_DELETE_RETENTION must not be negative")
        config["segment.ms"] = _ms(CHANGELOG_SEGMENT)
        config["max.compaction.lag.ms"] = _ms(CHANGELOG_MAX_COMPACTION_LAG)
        config["min.cleanable.dirty.ratio"] = CHANGELOG_MIN_CLEANABLE_DIRTY_RATIO
        config["delete.retention.ms"] = _ms(delete_retention)
    return config


async def ensure_topics(
    settings: ChoreoSettings,
    topics: Sequence[Topic] = ALL_TOPICS,
    config_overrides: Mapping[str, Mapping[str, str]] | None = None,
    *,
    update: bool = False,
) -> list[TopicDescription]:
    """Create what is missing and check what exists; safe to run again.

    With `update`, as `choreo topics create` and `choreo run` do, the configuration of existing topics is
    brought up to date and each change is returned. Without it (a service starting) nothing existing is
    altered, so a restart never undoes what provisioning or an operator set: a cleanup policy other than the
    registry's is an error, other differences are only logged. `config_overrides` (by registry name) go on
    top of `wanted_config`, for tests that need tiny values. A co-partitioned topic with another partition
    count is refused before anything is altered: adding partitions would move orders' keys to other
    partitions, and none can be removed.
    """
    overrides = config_overrides or {}
    wanted = {
        settings.topic(topic): {**wanted_config(settings, topic), **overrides.get(topic.name, {})} for topic in topics
    }
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [topic for topic in topics if settings.topic(topic) not in existing]
        created = await _create(admin, settings, missing, wanted) if missing else set()
        observed = await _describe(admin, list(wanted))
        if missing:
            await _await_leaders(
                settings, {name: observed[name].description.partitions for name in map(settings.topic, missing)}
            )
        changes = {name: _diff(config, observed[name].effective) for name, config in wanted.items()}
        problems = [
            problem
            for topic in topics
            for problem in _layout_problems(settings, topic, observed[settings.topic(topic)].description)
        ]
        if not update:
            problems += [
                f"topic {name} has cleanup.policy={change.old}, the registry requires {change.new} "
                "(`choreo topics create` changes it)"
                for name, found in changes.items()
                for change in found
                if change.key == "cleanup.policy"
            ]
        if problems:
            raise TopicConfigurationError("; ".join(problems))
        stale = [name for name, found in changes.items() if found]
        if stale and update:
            await _alter(admin, {name: {**observed[name].overrides, **wanted[name]} for name in stale})
            observed.update(await _await_configs(admin, {name: wanted[name] for name in stale}))
        for name in stale:
            for change in changes[name]:
                if update:
                    log.info("topic %s: %s changed from %s to %s", name, change.key, change.old, change.new)
                else:
                    log.warning(
                        "topic %s has %s=%s, the settings want %s; `choreo topics create` updates it",
                        name,
                        change.key,
                        change.old,
                        change.new,
                    )
        await _await_group_coordinator(admin, settings.group("choreo-provisioning"))
    finally:
        await admin.close()
    return [
        replace(observed[name].description, created=name in created, changes=tuple(changes[name]) if update else ())
        for name in wanted
    ]


async def describe_topics(settings: ChoreoSettings, topics: Sequence[Topic] = ALL_TOPICS) -> list[TopicDescription]:
    """Partitions and configuration of each topic as the broker reports them; absent topics are skipped."""
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        names = [settings.topic(topic) for topic in topics if settings.topic(topic) in existing]
        observed = await _describe(admin, names)
    finally:
        await admin.close()
    return [observed[name].description for name in names]


def human_duration(value: timedelta) -> str:
    """`8d`, `1h30m`, `100ms`: the largest units first, zero parts left out."""
    return human_ms(value // timedelta(milliseconds=1))


def human_ms(ms: int) -> str:
    # Kafka writes "no limit" as -1 (retention.ms) or as the largest long (max.compaction.lag.ms).
    if ms < 0 or ms >= _KAFKA_LONG_MAX:
        return "forever"
    if ms == 0:
        return "0ms"
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _ms(value: timedelta) -> str:
    return str(value // timedelta(milliseconds=1))


def _positive(name: str, value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise RetentionSettingsError(f"{name} must be positive, not {value}")
    return value


async def _create(
    admin: AIOKafkaAdminClient,
    settings: ChoreoSettings,
    topics: Iterable[Topic],
    wanted: Mapping[str, Mapping[str, str]],
) -> set[str]:
    """Create the topics; returns the names this call created."""
    requests = [
        NewTopic(
            name=settings.topic(topic),
            num_partitions=expected_partitions(settings, topic),
            replication_factor=settings.replication_factor,
            topic_configs=dict(wanted[settings.topic(topic)]),
        )
        for topic in topics
    ]
    response = await admin.create_topics(requests)
    created = set()
    for name, code, *rest in response.topic_errors:
        if code == _TOPIC_ALREADY_EXISTS:
            # Another process created it between our listing and our request: it is checked like any other.
            log.info("topic %s was created concurrently", name)
        elif code != 0:
            message = rest[0] if rest else ""
            raise for_code(code)(f"creating topic {name}: {message}")
        else:
            log.info("created topic %s", name)
            created.add(name)
    return created


async def _await_leaders(settings: ChoreoSettings, partitions_by_topic: Mapping[str, int]) -> None:
    """Wait until the leader of every partition of these new topics answers for it.

    The metadata names a new partition's leader before that broker has taken the partition on; until it has,
    a consumer's first offset lookup is refused with "not leader", and aiokafka logs that refusal as an ERROR.
    An offset lookup here, retried quietly by the client, makes sure the services never meet it. The topics
    are asked at once: the client learns of one unknown topic per retry, a backoff apart.
    """
    probe = consumer(settings, request_timeout_ms=int(METADATA_WAIT_S * 1000), retry_backoff_ms=LEADER_RETRY_MS)
    await probe.start()
    try:
        await asyncio.gather(
            *(
                probe.end_offsets([TopicPartition(name, partition) for partition in range(count)])
                for name, count in partitions_by_topic.items()
            )
        )
    finally:
        await probe.stop()


async def _alter(admin: AIOKafkaAdminClient, configs: Mapping[str, Mapping[str, str]]) -> None:
    # Plain AlterConfigs (aiokafka has no incremental variant) replaces the topic's whole set of overrides,
    # so the request carries the ones found on it too. Another admin changing the topic meanwhile can lose
    # its change: provisioning is meant to be the one writer of topic configuration.
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, dict(config)) for name, config in configs.items()]
    for response in await admin.alter_configs(resources):
        for code, message, _type, name in response.resources:
            if code != 0:
                raise for_code(code)(f"altering configuration of topic {name}: {message}")


async def _await_configs(admin: AIOKafkaAdminClient, wanted: Mapping[str, Mapping[str, str]]) -> dict[str, _Observed]:
    # A change goes through the controller's metadata log before the broker that answers describes it.
    deadline = time.monotonic() + METADATA_WAIT_S
    while True:
        observed = await _describe(admin, list(wanted))
        diffs = {name: _diff(config, observed[name].effective) for name, config in wanted.items()}
        stale = {name: changes for name, changes in diffs.items() if changes}
        if not stale:
            return observed
        if time.monotonic() > deadline:
            raise TopicConfigurationError(
                "; ".join(
                    f"topic {name} still has {change.key}={change.old} after it was altered to {change.new}"
                    for name, changes in stale.items()
                    for change in changes
                )
            )
        await asyncio.sleep(0.1)


def _diff(wanted: Mapping[str, str], effective: Mapping[str, str | None]) -> list[ConfigChange]:
    return [
        ConfigChange(key, effective.get(key), value) for key, value in wanted.items() if effective.get(key) != value
    ]


async def _await_group_coordinator(admin: AIOKafkaAdminClient, probe_group: str) -> None:
    """Have the brokers create their group topic, if they have not yet, and wait until it has every leader.

    A broker creates __consumer_offsets on the first coordinator lookup, and answers every lookup with
    "coordinator not available" until it is up: on a fresh broker, each service's consumer would meet
    that (aiokafka logs each failed lookup as an ERROR, then retries). Provisioning asks first.
    """
    deadline = time.monotonic() + GROUP_COORDINATOR_WAIT_S
    while True:
        try:
            await admin.find_coordinator(probe_group)
            [offsets] = await _topic_metadata(admin, [OFFSETS_TOPIC])
            if all(partition["leader"] >= 0 for partition in offsets["partitions"]):
                return
            problem = "partitions of it have no leader yet"
        except KafkaError as error:
            if not error.retriable:
                raise
            problem = repr(error)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no group coordinator within {GROUP_COORDINATOR_WAIT_S:.0f} s ({OFFSETS_TOPIC}: {problem}); "
                "are fewer brokers up than offsets.topic.replication.factor?"
            )
        await asyncio.sleep(0.1)


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


async def _describe(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, _Observed]:
    if not names:
        return {}
    metadata = await _topic_metadata(admin, names)
    layout: dict[str, tuple[int, int]] = {}
    placements: dict[str, tuple[PartitionPlacement, ...]] = {}
    for topic in metadata:
        partitions = topic["partitions"]
        layout[topic["topic"]] = (len(partitions), len(partitions[0]["replicas"]) if partitions else 0)
        placements[topic["topic"]] = tuple(
            sorted(
                (
                    PartitionPlacement(
                        p["partition"],
                        p["leader"] if p["leader"] >= 0 else None,
                        tuple(p["replicas"]),
                        tuple(p["isr"]),
                    )
                    for p in partitions
                ),
                key=lambda placement: placement.partition,
            )
        )
    observed: dict[str, _Observed] = {}
    for name, entries in (await topic_configs(admin, names)).items():
        partitions, replicas = layout[name]
        observed[name] = _Observed(
            description=TopicDescription(
                name, partitions, replicas, _shown_config(entries), placement=placements[name]
            ),
            effective={entry[0]: entry[1] for entry in entries},
            overrides={
                entry[0]: entry[1] for entry in entries if _is_topic_override(entry[3]) and entry[1] is not None
            },
        )
    return {name: observed[name] for name in names}


def _shown_config(entries: Iterable[Any]) -> dict[str, str]:
    entries = list(entries)
    policy = next((entry[1] for entry in entries if entry[0] == "cleanup.policy"), "delete") or "delete"
    always = {
        *_ALWAYS_SHOWN,
        *(_SHOWN_WITH_DELETE if "delete" in policy else ()),
        *(_COMPACTION_KEYS if "compact" in policy else ()),
    }
    shown = {}
    for entry in entries:
        key, value, _read_only, is_default = entry[0], entry[1], entry[2], entry[3]
        if key in always or not _is_default(is_default):
            shown[key] = value
    return dict(sorted(shown.items()))


def _is_default(flag_or_source: Any) -> bool:
    # DescribeConfigs v0 answers a boolean `is_default`; v1+ a config source, where 5 means the static default.
    if isinstance(flag_or_source, bool):
        return flag_or_source
    return int(flag_or_source) == _DEFAULT_CONFIG


def _is_topic_override(flag_or_source: Any) -> bool:
    # v0 cannot tell a topic's own value from the broker's; brokers that old are not supported anyway.
    if isinstance(flag_or_source, bool):
        return not flag_or_source
    return int(flag_or_source) == _DYNAMIC_TOPIC_CONFIG


def _layout_problems(settings: ChoreoSettings, topic: Topic, actual: TopicDescription) -> list[str]:
    if topic.partitioned_by_order and actual.partitions != expected_partitions(settings, topic):
        return [
            f"topic {actual.name} has {actual.partitions} partitions, co-partitioning requires "
            f"{expected_partitions(settings, topic)} (CHOREO_PARTITIONS); a partition count cannot be changed "
            "in place without moving orders to other partitions"
        ]
    return []

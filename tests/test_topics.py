"""`choreo topics` against the real broker: configuration read back, idempotence, drift corrected or refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAuthorizationFailedError, UnknownTopicOrPartitionError
from aiokafka.protocol.offset import OffsetRequest

from schemas.topics import ALL_TOPICS, MONITOR_STATE, ORDERS
from services.common.broker import BrokerSettings, LocalBroker
from services.common.kafka import admin_client, consumer, topic_configs
from services.common.settings import ChoreoSettings
from services.common.topics import OFFSETS_TOPIC, TopicConfigurationError, describe_topics, ensure_topics
from tests.kafka_fixtures import free_port
from tests.support import choreo, eventually


def test_create_makes_every_topic_with_its_configuration(choreo_settings: ChoreoSettings) -> None:
    created = choreo(choreo_settings, "topics", "create")
    assert created.returncode == 0, created.stderr
    assert [line.split()[0] for line in created.stdout.splitlines()[:-1]] == ["created"] * len(ALL_TOPICS)
    assert created.stdout.splitlines()[-1] == f"{len(ALL_TOPICS)} new, 0 updated, 0 already up to date"

    described = choreo(choreo_settings, "topics", "describe", "--json")
    assert described.returncode == 0, described.stderr
    topics = {row["name"]: row for row in map(json.loads, described.stdout.splitlines())}
    assert topics[choreo_settings.topic(MONITOR_STATE)]["config"]["cleanup.policy"] == "compact"
    assert topics[choreo_settings.topic(ORDERS)]["config"]["cleanup.policy"] == "delete"
    assert {row["partitions"] for row in topics.values()} == {choreo_settings.partitions}


async def test_create_is_idempotent(choreo_settings: ChoreoSettings) -> None:
    first = await ensure_topics(choreo_settings)
    second = await ensure_topics(choreo_settings)
    assert all(topic.created for topic in first)
    assert not any(topic.created for topic in second)
    assert [(t.name, t.partitions, t.config) for t in first] == [(t.name, t.partitions, t.config) for t in second]
    assert await describe_topics(choreo_settings) == [
        type(t)(t.name, t.partitions, t.replication_factor, t.config) for t in second
    ]


async def test_once_provisioning_returns_every_new_partition_s_leader_answers_offset_lookups_at_once(
    choreo_settings: ChoreoSettings,
) -> None:
    # A consumer's first request for a partition is an offset lookup; aiokafka logs a refusal of it as an ERROR.
    described = await ensure_topics(choreo_settings)
    assert all(topic.created for topic in described)
    lookup = consumer(choreo_settings)
    await lookup.start()
    try:
        await lookup._client.force_metadata_update()
        cluster = lookup._client.cluster
        by_leader: dict[int, dict[str, list[tuple[int, int]]]] = {}
        for topic in described:
            for partition in range(topic.partitions):
                leader = cluster.leader_for_partition(TopicPartition(topic.name, partition))
                assert leader is not None, (topic.name, partition)
                assert leader >= 0, (topic.name, partition)
                by_leader.setdefault(leader, {}).setdefault(topic.name, []).append((partition, -1))
        # One request per leader and no retry: every partition must be answered the first time it is asked.
        answers = {
            (name, partition): code
            for leader, topics in by_leader.items()
            for name, partitions in (
                await lookup._client.send(leader, OffsetRequest(-1, 1, list(topics.items())))
            ).topics
            for partition, code, *_ in partitions
        }
    finally:
        await lookup.stop()
    assert len(answers) == sum(topic.partitions for topic in described)
    assert {key: code for key, code in answers.items() if code != 0} == {}


async def test_a_topic_with_the_wrong_cleanup_policy_is_corrected_and_reported(
    choreo_settings: ChoreoSettings,
) -> None:
    admin = admin_client(choreo_settings)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(choreo_settings.topic(MONITOR_STATE), 6, 1, topic_configs={"cleanup.policy": "delete"})]
        )
    finally:
        await admin.close()
    # A service starting alters nothing and refuses to run on it.
    with pytest.raises(
        TopicConfigurationError, match=r"monitor\.state has cleanup\.policy=delete, the registry requires compact"
    ):
        await ensure_topics(choreo_settings, [MONITOR_STATE])

    cli = choreo(choreo_settings, "topics", "create")
    assert cli.returncode == 0, cli.stderr
    assert f"updated  {choreo_settings.topic(MONITOR_STATE)} (6 partitions)" in cli.stdout
    assert "cleanup.policy: delete -> compact" in cli.stdout
    (described,) = await describe_topics(choreo_settings, [MONITOR_STATE])
    assert described.config["cleanup.policy"] == "compact"


async def test_a_topic_with_the_wrong_partition_count_is_an_error(choreo_settings: ChoreoSettings) -> None:
    admin = admin_client(choreo_settings)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(choreo_settings.topic(ORDERS), 2, 1, topic_configs={})])
    finally:
        await admin.close()
    cli = choreo(choreo_settings, "topics", "create")
    assert cli.returncode == 1
    assert "2 partitions, co-partitioning requires 6" in cli.stderr
    with pytest.raises(TopicConfigurationError, match="cannot be changed in place"):
        await ensure_topics(choreo_settings)
    # Refused before anything was altered: the topic keeps the broker's default retention.
    (orders,) = await describe_topics(choreo_settings, [ORDERS])
    assert orders.config["retention.ms"] == str(7 * 24 * 3600 * 1000)


@pytest.mark.slow
async def test_on_a_fresh_broker_provisioning_readies_the_group_coordinator_before_any_consumer_asks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A broker of its own: the session's has long had its group topic.
    broker = LocalBroker(BrokerSettings(port=free_port(), run_dir=tmp_path / "broker", heap="256m"))
    broker.start(timeout=120)
    try:
        settings = ChoreoSettings(bootstrap_servers=broker.bootstrap, environment="test")
        admin = admin_client(settings)
        await admin.start()
        try:
            assert OFFSETS_TOPIC not in await admin.list_topics()
            await ensure_topics(settings, [ORDERS])
            assert OFFSETS_TOPIC in await admin.list_topics()
        finally:
            await admin.close()

        caplog.set_level(logging.WARNING, logger="aiokafka")
        consumer = AIOKafkaConsumer(settings.topic(ORDERS), **settings.kafka_options(), group_id=settings.group("g"))
        await consumer.start()
        try:
            await eventually(lambda: _assigned(consumer), bool, timeout=30)
        finally:
            await consumer.stop()
        # Without it, the consumer's first coordinator lookups fail and aiokafka logs each one as an ERROR.
        assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    finally:
        broker.stop()


async def _assigned(consumer: AIOKafkaConsumer) -> set[TopicPartition]:
    assignment: set[TopicPartition] = consumer.assignment()
    return assignment


class _BrokersLearningOfATopic:
    """An admin whose DescribeConfigs answers "unknown topic" the first `unknown_answers` times, as a broker
    that has not yet seen a topic just created does."""

    def __init__(self, unknown_answers: int, code: int = 3) -> None:
        self.unknown_answers, self.code, self.asked = unknown_answers, code, 0

    async def describe_configs(self, resources: list[Any]) -> list[Any]:
        self.asked += 1
        known = self.asked > self.unknown_answers
        rows = [
            (0, None, 2, resource.name, [("cleanup.policy", "compact", False, 5)])
            if known
            else (self.code, "", 2, resource.name, [])
            for resource in resources
        ]
        return [SimpleNamespace(resources=rows)]


async def test_a_topic_a_broker_has_not_seen_yet_is_described_again() -> None:
    admin = _BrokersLearningOfATopic(unknown_answers=2)
    configs = await topic_configs(cast(AIOKafkaAdminClient, admin), ["fresh"], wait_s=5.0)
    assert configs == {"fresh": [("cleanup.policy", "compact", False, 5)]}
    assert admin.asked == 3


async def test_a_topic_unknown_past_the_wait_is_an_error() -> None:
    admin = _BrokersLearningOfATopic(unknown_answers=10**6)
    with pytest.raises(UnknownTopicOrPartitionError, match="fresh"):
        await topic_configs(cast(AIOKafkaAdminClient, admin), ["fresh"], wait_s=0.3)
    assert admin.asked > 1


async def test_another_describe_error_is_not_asked_again() -> None:
    admin = _BrokersLearningOfATopic(unknown_answers=1, code=TopicAuthorizationFailedError.errno)
    with pytest.raises(TopicAuthorizationFailedError):
        await topic_configs(cast(AIOKafkaAdminClient, admin), ["fresh"], wait_s=5.0)
    assert admin.asked == 1

"""Every transaction client on the real broker: what a commit writes, what a fence stops."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from aiokafka import TopicPartition

from schemas.topics import AUDIT, INVENTORY_EVENTS, ORDERS
from services.common.kafka import admin_client, partition_for
from services.common.settings import ChoreoSettings
from services.common.transactions import BATCH_BYTES, FencedError, Outgoing, fence
from services.common.transactions.kip890 import Kip890Transactions
from tests.support import eventually, read_topic, started_transactions

CLIENTS = ("kip890", "aiokafka", "confluent")
COMMITS = 150
CLIENT_LOGGERS = ("aiokafka", "librdkafka")


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_commit_writes_its_records_where_their_keys_belong_and_tags_its_offsets(
    choreo_settings: ChoreoSettings, client: str
) -> None:
    # Given a producer on one of the clients
    settings = choreo_settings.model_copy(update={"transaction_client": client})
    async with started_transactions(settings, f"{settings.topic_prefix}tx") as producer:
        # When it commits keyed records, one with its own partition, and an offset with a tag
        keys = [f"k-{index}".encode() for index in range(20)]
        records = [Outgoing(settings.topic(AUDIT), key, b"v" + key) for key in keys]
        records.append(Outgoing(settings.topic(AUDIT), b"pinned", b"v", partition=1, headers=(("h", b"1"),)))
        offsets = {TopicPartition(settings.topic(AUDIT), 0): (7, "tag-1")}
        written = await producer.commit(records, offsets, settings.group("probe"))
    # Then each record is where murmur2 (Java's and aiokafka's partitioner) puts its key, in order
    # (visible once the coordinator has written the commit markers, just after the commit returns)
    rows = await eventually(lambda: read_topic(settings, AUDIT), lambda found: len(found) >= len(records), timeout=30)
    found = {(row.partition, row.offset): row for row in rows}
    assert len(written) == len(records) == len(found)
    for record, where in zip(records, written, strict=True):
        row = found[(where.partition, where.offset)]
        assert (row.key, row.value) == (record.key, record.value)
    assert written[-1].partition == 1
    assert [where.partition for where in written[:-1]] == [partition_for(key, settings.partitions) for key in keys]
    # And the offset is committed for the group, with its tag
    admin = admin_client(settings)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(settings.group("probe"))
    finally:
        await admin.close()
    found_offset = committed[TopicPartition(settings.topic(AUDIT), 0)]
    # (librdkafka's metadata arrives with its C string's terminating NUL)
    assert (found_offset.offset, found_offset.metadata.rstrip("\0")) == (7, "tag-1")


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_commit_larger_than_a_producer_batch_keeps_each_partitions_order(
    choreo_settings: ChoreoSettings, client: str
) -> None:
    # Given a producer on one of the clients
    settings = choreo_settings.model_copy(update={"transaction_client": client})
    async with started_transactions(settings, f"{settings.topic_prefix}tx-large") as producer:
        # When one commit carries, to two partitions in turn, more than a producer batch holds
        value = b"x" * (BATCH_BYTES // 40)
        records = [
            Outgoing(settings.topic(AUDIT), f"k-{index}".encode(), value + str(index).encode(), partition=index % 2)
            for index in range(100)
        ]
        written = await producer.commit(records, {}, settings.group("probe"))
    # Then every record is where its offset says, and each partition holds its records in the order given
    rows = await eventually(lambda: read_topic(settings, AUDIT), lambda found: len(found) >= len(records), timeout=30)
    found = {(row.partition, row.offset): row.value for row in rows}
    assert [found[(where.partition, where.offset)] for where in written] == [record.value for record in records]
    for partition in (0, 1):
        in_topic = [row.value for row in sorted(rows, key=lambda row: row.offset) if row.partition == partition]
        assert in_topic == [record.value for record in records if record.partition == partition]


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_fenced_producer_can_commit_nothing(choreo_settings: ChoreoSettings, client: str) -> None:
    # Given a started producer
    settings = choreo_settings.model_copy(update={"transaction_client": client})
    transactional_id = f"{settings.topic_prefix}zombie"
    async with started_transactions(settings, transactional_id) as zombie:
        # When a newer owner fences its id
        await fence(settings, transactional_id)
        # Then its next commit fails as fenced, and nothing of it is visible
        with pytest.raises(FencedError):
            await zombie.commit([Outgoing(settings.topic(AUDIT), b"k", b"late")], {}, settings.group("probe"))
    assert await read_topic(settings, AUDIT) == []


@pytest.mark.parametrize("client", CLIENTS)
async def test_back_to_back_commits_meet_no_retried_errors(
    choreo_settings: ChoreoSettings, client: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a producer on one of the clients, its client libraries' warnings captured
    settings = choreo_settings.model_copy(update={"transaction_client": client})
    for logger in CLIENT_LOGGERS:
        caplog.set_level(logging.WARNING, logger=logger)
    async with started_transactions(settings, f"{settings.topic_prefix}tx") as producer:
        # (that has written to every partition once: a topic just created may not have its leaders yet)
        warm_up = [
            Outgoing(settings.topic(topic), None, b"v", partition=partition)
            for topic in (AUDIT, INVENTORY_EVENTS)
            for partition in range(settings.partitions)
        ]
        await producer.commit(warm_up, {}, settings.group("probe"))
        caplog.clear()
        # (what a KIP-890 client sent again while coordinators were elected at its start is not counted)
        retried_at_start = Counter(producer.retried) if isinstance(producer, Kip890Transactions) else Counter()
        # When it commits transaction after transaction, each with records on two topics and offsets
        for batch in range(COMMITS):
            records = [
                Outgoing(settings.topic(topic), f"k-{batch}-{index}".encode(), b"v")
                for index, topic in enumerate((AUDIT, INVENTORY_EVENTS, AUDIT))
            ]
            offsets = {TopicPartition(settings.topic(ORDERS), batch % settings.partitions): (batch + 1, "")}
            await producer.commit(records, offsets, settings.group("probe"))
        # Then no request was answered with an error to retry (the broker's transaction verification
        # answers a produce NOT_ENOUGH_REPLICAS while the coordinator adds the offsets at the same time)
        # (the KIP-890 client retries without a warning: it counts what it sent again)
        retried = producer.retried - retried_at_start if isinstance(producer, Kip890Transactions) else Counter()
    client_records = [record for record in caplog.records if record.name.split(".")[0] in CLIENT_LOGGERS]
    assert [record.getMessage() for record in client_records if record.levelno >= logging.WARNING] == []
    assert retried == {}


async def test_the_kip890_client_reads_the_clusters_transaction_version(choreo_settings: ChoreoSettings) -> None:
    # Given the test broker, a fresh Kafka 4.x cluster, and a KIP-890 client on it
    async with started_transactions(choreo_settings, f"{choreo_settings.topic_prefix}tv") as producer:
        assert isinstance(producer, Kip890Transactions)
        # When it asks which features the cluster finalizes
        features = await producer.finalized_features()
    # Then it finds transaction.version 2, which its requests need
    assert features.get("transaction.version") == 2


async def test_the_kip890_client_refuses_a_cluster_without_transaction_version_2(
    choreo_settings: ChoreoSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a cluster that finalizes transaction.version 1 (as an upgraded 3.x cluster may)
    async def version_1(self: Kip890Transactions) -> dict[str, int]:
        return {"transaction.version": 1}

    monkeypatch.setattr(Kip890Transactions, "finalized_features", version_1)
    producer = Kip890Transactions(choreo_settings, f"{choreo_settings.topic_prefix}tv1")
    # When a KIP-890 producer starts on it
    # Then it refuses with what to do instead, before it registers its id
    with pytest.raises(RuntimeError, match="CHOREO_TRANSACTION_CLIENT=aiokafka"):
        await producer.start()
    assert producer.retried == {}
    await producer.stop()

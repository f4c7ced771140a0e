"""Both transaction clients on the real broker: what a commit writes, what a fence stops."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from schemas.topics import AUDIT
from services.common.kafka import admin_client, partition_for
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from services.common.transactions import FencedError, Outgoing, fence, transactions
from tests.support import eventually, read_topic

CLIENTS = ("aiokafka", "confluent")


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_commit_writes_its_records_where_their_keys_belong_and_tags_its_offsets(
    choreo_settings: ChoreoSettings, client: str
) -> None:
    # Given a producer on one of the clients
    settings = choreo_settings.model_copy(update={"transaction_client": client})
    await ensure_topics(settings)
    producer = transactions(settings, f"{settings.topic_prefix}tx")
    await producer.start()
    try:
        # When it commits keyed records, one with its own partition, and an offset with a tag
        keys = [f"k-{index}".encode() for index in range(20)]
        records = [Outgoing(settings.topic(AUDIT), key, b"v" + key) for key in keys]
        records.append(Outgoing(settings.topic(AUDIT), b"pinned", b"v", partition=1, headers=(("h", b"1"),)))
        offsets = {TopicPartition(settings.topic(AUDIT), 0): (7, "tag-1")}
        written = await producer.commit(records, offsets, settings.group("probe"))
    finally:
        await producer.stop()
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
async def test_a_fenced_producer_can_commit_nothing(choreo_settings: ChoreoSettings, client: str) -> None:
    # Given a started producer
    settings = choreo_settings.model_copy(update={"transaction_client": client})
    await ensure_topics(settings)
    transactional_id = f"{settings.topic_prefix}zombie"
    zombie = transactions(settings, transactional_id)
    await zombie.start()
    try:
        # When a newer owner fences its id
        await fence(settings, transactional_id)
        # Then its next commit fails as fenced, and nothing of it is visible
        with pytest.raises(FencedError):
            await zombie.commit([Outgoing(settings.topic(AUDIT), b"k", b"late")], {}, settings.group("probe"))
    finally:
        await zombie.stop()
    assert await read_topic(settings, AUDIT) == []

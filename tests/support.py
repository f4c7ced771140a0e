"""Helpers for tests that talk to the real broker: run the CLI, read a topic, poll for a condition."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.topics import Topic
from services.common.kafka import admin_client
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from services.common.transactions import Transactions, transactions

T = TypeVar("T")


def choreo(settings: ChoreoSettings, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `choreo` command line against the test's broker and topic prefix."""
    env = {
        **os.environ,
        "CHOREO_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "CHOREO_TOPIC_PREFIX": settings.topic_prefix,
    }
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


async def read_topic(settings: ChoreoSettings, topic: Topic) -> list[Any]:
    """Every committed record of `topic` that is there now, in partition then offset order."""
    # A fresh assignment starts at `auto_offset_reset`; an explicit seek can race the position reset.
    consumer = AIOKafkaConsumer(
        **settings.kafka_options(),
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        name = settings.topic(topic)
        partitions = [TopicPartition(name, p) for p in range(settings.partitions)]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[Any] = []
        for tp in partitions:
            while await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                records.extend(batch.get(tp, []))
        return records
    finally:
        await consumer.stop()


async def eventually(
    probe: Callable[[], Awaitable[T]], condition: Callable[[T], bool], *, timeout: float = 30.0, interval: float = 0.2
) -> T:
    """Poll `probe` until `condition` holds for its result; fail with the last result after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if condition(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last result: {result!r}")
        await asyncio.sleep(interval)


async def end_offsets(settings: ChoreoSettings, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The log end offset of each partition now (control records included)."""
    consumer = AIOKafkaConsumer(**settings.kafka_options())
    await consumer.start()
    try:
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return ends
    finally:
        await consumer.stop()


async def committed_offsets(
    settings: ChoreoSettings, group: str, partitions: list[TopicPartition] | None = None
) -> dict[TopicPartition, int]:
    """What `group` has committed for each of `partitions` (-1 where nothing), or for all it has committed."""
    admin = admin_client(settings)
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    if partitions is None:
        return {tp: meta.offset for tp, meta in found.items() if isinstance(tp, TopicPartition)}
    return {tp: found[tp].offset if tp in found else -1 for tp in partitions}


@asynccontextmanager
async def started_transactions(settings: ChoreoSettings, transactional_id: str) -> AsyncIterator[Transactions]:
    """A started transactional producer of `settings`' client, on topics that exist; stopped on leaving."""
    await ensure_topics(settings)
    producer = transactions(settings, transactional_id)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()

"""The transactional runner on the real broker: what a commit interval batches, and what a clean stop keeps."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta

from schemas.topics import AUDIT, AUDIT_STATE, ORDERS, Topic
from services.common.kafka import producer as make_producer
from services.common.processor import Incoming, TaskContext, TransactionalRunner
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from tests.support import committed_offsets, eventually, read_topic

RECORDS = 60


class Echo:
    """Copies every input record to the audit topic and counts it in its state."""

    name = "echo"
    inputs: Sequence[Topic] = (ORDERS,)
    changelog: Topic = AUDIT_STATE

    def process(self, task: TaskContext, message: Incoming) -> None:
        assert message.key is not None
        assert message.value is not None
        task.send(AUDIT, message.key.decode(), message.value)

    def tick(self, task: TaskContext, now: datetime) -> None:
        """No timers."""


async def publish(settings: ChoreoSettings, count: int, *, pause_s: float = 0.0) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for index in range(count):
            await producer.send(settings.topic(ORDERS), f"v-{index}".encode(), key=f"k-{index}".encode())
            if pause_s:
                await producer.flush()
                await asyncio.sleep(pause_s)
        await producer.flush()
    finally:
        await producer.stop()


async def committed_total(settings: ChoreoSettings, group: str) -> int:
    return sum(offset for offset in (await committed_offsets(settings, group)).values() if offset > 0)


async def test_a_commit_interval_carries_many_records_in_one_transaction(choreo_settings: ChoreoSettings) -> None:
    # Given a runner that commits at most every 2 s
    settings = choreo_settings.model_copy(update={"commit_interval": timedelta(seconds=2)})
    await ensure_topics(settings)
    runner = TransactionalRunner(settings, Echo())
    running = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(runner.wait_assigned(), 60)
        # When records arrive one by one, 20 ms apart (without the interval, a transaction each)
        await publish(settings, RECORDS, pause_s=0.02)
        # Then every one is copied, in far fewer transactions than records
        copied = await eventually(lambda: read_topic(settings, AUDIT), lambda rows: len(rows) >= RECORDS, timeout=60)
        assert sorted(row.value for row in copied) == sorted(f"v-{index}".encode() for index in range(RECORDS))
        assert 1 <= runner.stats.transactions < RECORDS / 4
    finally:
        runner.stop()
        await asyncio.wait_for(running, 60)


async def test_a_clean_stop_commits_what_the_interval_still_held(choreo_settings: ChoreoSettings) -> None:
    # Given a runner whose interval is far longer than the test
    settings = choreo_settings.model_copy(update={"commit_interval": timedelta(minutes=10)})
    await ensure_topics(settings)
    runner = TransactionalRunner(settings, Echo())
    running = asyncio.create_task(runner.run())
    await asyncio.wait_for(runner.wait_assigned(), 60)
    await publish(settings, RECORDS)
    await eventually(lambda: asyncio.sleep(0, runner.stats.batches), lambda batches: batches > 0, timeout=60)
    await eventually(runner.lag, lambda behind: behind == 0, timeout=60)
    assert await read_topic(settings, AUDIT) == []  # nothing committed yet
    # When it is stopped
    runner.stop()
    await asyncio.wait_for(running, 60)
    # Then what it had handled is committed: the outputs and the input offsets
    copied = await read_topic(settings, AUDIT)
    assert len(copied) == RECORDS
    assert await committed_total(settings, settings.group(Echo.name)) == RECORDS

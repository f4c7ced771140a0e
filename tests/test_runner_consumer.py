"""Both input consumers of the runner on the real broker: what the in-process hand-over and a rewind rely on."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import ConsumerRebalanceListener, TopicPartition

from schemas.topics import AUDIT
from services.common.runner_consumer import ConfluentRunnerConsumer, RunnerConsumer, runner_consumer
from services.common.settings import ChoreoSettings
from services.common.transactions import Outgoing
from tests.support import started_transactions

CLIENTS = ("aiokafka", "confluent")
RECORDS = 12


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Seeks each assigned partition to `starts` from inside the assignment, as the runner does."""

    def __init__(self, consumer: list[RunnerConsumer], starts: dict[TopicPartition, int]) -> None:
        self.consumer = consumer
        self.starts = starts
        self.assigned: list[TopicPartition] = []
        self.revoked: list[TopicPartition] = []
        self.ends: dict[TopicPartition, int] = {}

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await asyncio.sleep(0)  # a coroutine that yields, as the runner's does
        for tp in assigned:
            if tp in self.starts:
                self.consumer[0].seek(tp, self.starts[tp])
        self.ends = await self.consumer[0].end_offsets(assigned)
        self.assigned = list(assigned)

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.revoked = list(revoked)


async def _read(consumer: RunnerConsumer, tp: TopicPartition, until: int, timeout: float = 30) -> list[int]:
    """The offsets read on `tp` until the position reaches `until`."""
    offsets: list[int] = []
    async with asyncio.timeout(timeout):
        while await consumer.position(tp) < until:
            batch = await consumer.getmany(100)
            offsets += [row.offset for row in batch.get(tp, [])]
    return offsets


@pytest.mark.parametrize("client", CLIENTS)
async def test_the_consumer_reads_committed_records_from_where_the_assignment_seeks_past_the_commit_marker(
    choreo_settings: ChoreoSettings, client: str
) -> None:
    # Given a transaction of records on partition 0 and one aborted after it
    settings = choreo_settings.model_copy(update={"consumer_client": client})
    topic = settings.topic(AUDIT)
    tp = TopicPartition(topic, 0)
    async with started_transactions(settings, f"{settings.topic_prefix}writer") as producer:
        await producer.commit([Outgoing(topic, b"k", b"v%d" % i, partition=0) for i in range(RECORDS)], {}, "g")
    # When a consumer of the group is assigned it and seeks to offset 5 from inside the assignment
    holder: list[RunnerConsumer] = []
    listener = _Listener(holder, {tp: 5})
    consumer = runner_consumer(settings, settings.group(f"probe-{client}"), max_batch=100)
    holder.append(consumer)
    await consumer.start([topic], listener)
    try:
        offsets = await _until_assigned(consumer, listener, tp)
        ends = (await consumer.end_offsets([tp]))[tp]
        # Then it reads the committed records from there on, in order, and its position passes the marker
        offsets += await _read(consumer, tp, until=ends)
        assert offsets == list(range(5, RECORDS))
        assert ends == RECORDS + 1  # the records and their commit marker
        assert await consumer.position(tp) == ends
        assert tp in consumer.assignment()
        # And after a seek back (a rewind) it reads them again
        consumer.seek(tp, 8)
        assert await _read(consumer, tp, until=ends) == list(range(8, RECORDS))
        lag = dict(consumer.fetched_lag())
        assert lag.get(tp, 0) <= 1
    finally:
        await consumer.stop()
    assert listener.revoked or client == "aiokafka"  # librdkafka revokes on close; aiokafka may not call back


async def _until_assigned(consumer: RunnerConsumer, listener: _Listener, tp: TopicPartition) -> list[int]:
    """Let the group assign `tp`; the offsets of what was read meanwhile."""
    offsets: list[int] = []
    async with asyncio.timeout(30):
        while tp not in listener.assigned:
            batch = await consumer.between_assignments(0.05)
            offsets += [row.offset for row in batch.get(tp, [])]
    return offsets


class _ScriptedPolls:
    """Stands in for librdkafka's consumer: each poll returns the next message, and an entry of None with a
    callback runs that callback inside the poll first (as librdkafka serves an assignment)."""

    def __init__(self, script: list[tuple[str | None, bool]], consumer: ConfluentRunnerConsumer) -> None:
        self.script = list(script)
        self.consumer = consumer

    def poll(self, _timeout: float) -> str | None:
        if not self.script:
            return None
        message, rebalanced = self.script.pop(0)
        if rebalanced:
            self.consumer._generation += 1
        return message


@pytest.mark.parametrize(
    ("script", "kept"),
    [
        ([("a", False), ("b", False)], ["a", "b"]),
        # an assignment served inside the third poll: the first two were the assignment before it
        ([("a", False), ("b", False), ("c", True), ("d", False)], ["c", "d"]),
        # served inside the poll that found nothing more: everything read belonged to the old assignment
        ([("a", False), (None, True)], []),
        ([(None, True)], []),
    ],
)
def test_records_read_before_an_assignment_changed_are_dropped_and_those_after_are_kept(
    script: list[tuple[str | None, bool]], kept: list[str]
) -> None:
    # Given librdkafka's polls, one of which may serve an assignment (no broker: the rule alone)
    consumer = ConfluentRunnerConsumer(ChoreoSettings(environment="test"), "group", max_batch=10)
    consumer._consumer = _ScriptedPolls(script, consumer)  # type: ignore[assignment]
    # When a batch is read, then only what the current assignment read is kept
    assert consumer._consume(0.0) == kept

"""The transactional runner on the real broker: what a commit interval batches, what a clean stop keeps,
what a failed commit leaves, and when a request between two stages skips its topic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import msgspec
import pytest
from aiokafka import TopicPartition

from schemas.topics import AUDIT, AUDIT_STATE, ORDERS, PAYMENT_EVENTS, STOCK_REQUESTS, Topic
from services.common.kafka import partition_for
from services.common.kafka import producer as make_producer
from services.common.processor import Incoming, TaskContext, TransactionalRunner
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from services.common.transactions import Outgoing, TransactionFailedError, Transactions, Written, transactions
from tests.support import committed_offsets, eventually, read_topic

RECORDS = 60


class Echo:
    """Copies every input record to the audit topic."""

    name = "echo"
    inputs: Sequence[Topic] = (ORDERS,)
    changelog: Topic = AUDIT_STATE
    in_process: Sequence[Topic] = ()
    mostly_skipped: Sequence[Topic] = ()

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


@asynccontextmanager
async def assigned(runner: TransactionalRunner) -> AsyncIterator[TransactionalRunner]:
    """`runner` running and assigned its tasks; stopped, and awaited, on the way out."""
    running = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(runner.wait_assigned(), 60)
        yield runner
    finally:
        runner.stop()
        await asyncio.wait_for(running, 60)


async def committed_total(settings: ChoreoSettings, group: str) -> int:
    return sum(offset for offset in (await committed_offsets(settings, group)).values() if offset > 0)


async def copy_records_arriving_apart(settings: ChoreoSettings) -> None:
    """Publish `RECORDS` records one by one, 20 ms apart, and wait until the runner has copied every one."""
    await publish(settings, RECORDS, pause_s=0.02)
    copied = await eventually(lambda: read_topic(settings, AUDIT), lambda rows: len(rows) >= RECORDS, timeout=60)
    assert sorted(row.value for row in copied) == sorted(f"v-{index}".encode() for index in range(RECORDS))


async def test_a_commit_interval_carries_many_records_in_one_transaction(choreo_settings: ChoreoSettings) -> None:
    # Given a runner that commits at most every 2 s
    settings = choreo_settings.model_copy(update={"commit_interval": timedelta(seconds=2)})
    await ensure_topics(settings)
    runner = TransactionalRunner(settings, Echo())
    async with assigned(runner):
        # When records arrive one by one, 20 ms apart (without the interval, a transaction each)
        # Then every one is copied, in far fewer transactions than records
        await copy_records_arriving_apart(settings)
        assert 1 <= runner.stats.transactions < RECORDS / 4


class Skipping(Echo):
    """Copies only the records whose value ends in `-copy`: every other one changes nothing."""

    def process(self, task: TaskContext, message: Incoming) -> None:
        if message.value is not None and message.value.endswith(b"-copy"):
            super().process(task, message)


async def test_records_that_change_nothing_start_no_transaction_of_their_own(choreo_settings: ChoreoSettings) -> None:
    # Given a runner with the default commit interval that writes nothing for the records it skips
    await ensure_topics(choreo_settings)
    runner = TransactionalRunner(choreo_settings, Skipping())
    async with assigned(runner):
        # When such records arrive one by one, 20 ms apart (a transaction each, were offsets alone one)
        await publish(choreo_settings, RECORDS, pause_s=0.02)
        # Then their offsets are committed all the same, in far fewer transactions than records
        group = choreo_settings.group(Skipping.name)
        await eventually(lambda: committed_total(choreo_settings, group), lambda total: total == RECORDS, timeout=60)
        assert 1 <= runner.stats.transactions < RECORDS / 4
        # And a record that writes something is committed within the interval, as ever
        await publish_to(choreo_settings, ORDERS, [("k-last", "last-copy")])
        copied = await eventually(lambda: read_topic(choreo_settings, AUDIT), lambda rows: len(rows) == 1, timeout=60)
        assert copied[0].value == b"last-copy"


@pytest.mark.parametrize("held", [True, False], ids=["held", "not-held"])
async def test_held_fetches_bring_an_interval_s_arrivals_in_one_read(
    choreo_settings: ChoreoSettings, held: bool
) -> None:
    # Given a runner that commits at most every 300 ms, whose fetches the broker may hold that long
    settings = choreo_settings.model_copy(
        update={
            "commit_interval": timedelta(milliseconds=300),
            "fetch_max_wait": timedelta(milliseconds=500),
            "held_fetches": held,
        }
    )
    await ensure_topics(settings)
    runner = TransactionalRunner(settings, Echo())
    async with assigned(runner):
        # When records arrive one by one, 20 ms apart (15 in each interval)
        # Then every one is copied
        await copy_records_arriving_apart(settings)
    # And held fetches read them a few reads an interval, where fetches that return at the first record
    # read nearly each on its own
    if held:
        assert runner.stats.reads < RECORDS / 3
    else:
        assert runner.stats.reads > RECORDS / 2


class SkippingOrders(Skipping):
    """Reads orders mostly to skip them, beside a topic it would act on."""

    inputs: Sequence[Topic] = (ORDERS, PAYMENT_EVENTS)
    mostly_skipped: Sequence[Topic] = (ORDERS,)


class SkippingUndeclared(SkippingOrders):
    mostly_skipped: Sequence[Topic] = ()


@pytest.mark.parametrize("app", [SkippingOrders, SkippingUndeclared], ids=["declared", "undeclared"])
async def test_inputs_mostly_skipped_are_read_once_an_interval_not_at_each_arrival(
    choreo_settings: ChoreoSettings, app: type[SkippingOrders]
) -> None:
    # Given a runner that commits at most every 300 ms, with nothing to commit but offsets
    settings = choreo_settings.model_copy(update={"commit_interval": timedelta(milliseconds=300)})
    await ensure_topics(settings)
    runner = TransactionalRunner(settings, app())
    async with assigned(runner):
        # When records it skips arrive on orders one by one, 20 ms apart (15 in each interval)
        await publish(settings, RECORDS, pause_s=0.02)
        await eventually(runner.lag, lambda behind: behind == 0, timeout=60)
        reads = runner.stats.reads
        # Then a record there that writes something is still copied
        await publish_to(settings, ORDERS, [("k-last", "last-copy")])
        copied = await eventually(lambda: read_topic(settings, AUDIT), lambda rows: len(rows) == 1, timeout=60)
        assert copied[0].value == b"last-copy"
    # And declared mostly skipped, orders were read a few times an interval; undeclared, nearly at each arrival
    if app is SkippingOrders:
        assert reads < RECORDS / 3
    else:
        assert reads > RECORDS / 2


async def test_a_clean_stop_commits_what_the_interval_still_held(choreo_settings: ChoreoSettings) -> None:
    # Given a runner whose interval is far longer than the test, which has just committed (a record
    # after a quiet interval commits at once)
    settings = choreo_settings.model_copy(update={"commit_interval": timedelta(minutes=10)})
    await ensure_topics(settings)
    runner = TransactionalRunner(settings, Echo())
    running = asyncio.create_task(runner.run())
    await asyncio.wait_for(runner.wait_assigned(), 60)
    await publish_to(settings, ORDERS, [("first", "first")])
    await eventually(lambda: read_topic(settings, AUDIT), lambda rows: len(rows) == 1, timeout=60)
    # And has handled more records since, within its interval
    await publish(settings, RECORDS)
    await eventually(lambda: asyncio.sleep(0, runner.stats.batches), lambda batches: batches > 1, timeout=60)
    await eventually(runner.lag, lambda behind: behind == 0, timeout=60)
    assert len(await read_topic(settings, AUDIT)) == 1  # nothing more committed yet
    # When it is stopped
    runner.stop()
    await asyncio.wait_for(running, 60)
    # Then what it had handled is committed: the outputs and the input offsets
    copied = await read_topic(settings, AUDIT)
    assert len(copied) == RECORDS + 1
    assert await committed_total(settings, settings.group(Echo.name)) == RECORDS + 1


class TwoStages:
    """Each order asks the stage of the SKU named in its value; that stage logs the request on audit."""

    name = "two-stages"
    inputs: Sequence[Topic] = (ORDERS, STOCK_REQUESTS)
    changelog: Topic = AUDIT_STATE
    in_process: Sequence[Topic] = (STOCK_REQUESTS,)
    mostly_skipped: Sequence[Topic] = ()

    def process(self, task: TaskContext, message: Incoming) -> None:
        assert message.key is not None
        assert message.value is not None
        if message.topic == ORDERS:
            task.send(STOCK_REQUESTS, message.value.decode(), message.key)
        else:
            task.send(AUDIT, message.key.decode(), message.value)

    def tick(self, task: TaskContext, now: datetime) -> None:
        """No timers."""


async def publish_to(settings: ChoreoSettings, topic: Topic, records: list[tuple[str, str]]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for key, value in records:
            await producer.send(settings.topic(topic), value.encode(), key=key.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def test_a_request_to_an_own_task_is_handed_over_without_its_topic(choreo_settings: ChoreoSettings) -> None:
    # Given one runner, which owns every task
    await ensure_topics(choreo_settings)
    runner = TransactionalRunner(choreo_settings, TwoStages())
    async with assigned(runner):
        # When orders ask SKU stages
        await publish_to(choreo_settings, ORDERS, [(f"o-{index}", f"sku-{index % 7}") for index in range(RECORDS)])
        # Then every request is answered, and none went through the request topic
        logged = await eventually(
            lambda: read_topic(choreo_settings, AUDIT), lambda rows: len(rows) >= RECORDS, timeout=60
        )
        assert sorted(row.value for row in logged) == sorted(f"o-{index}".encode() for index in range(RECORDS))
        assert await read_topic(choreo_settings, STOCK_REQUESTS) == []
        assert runner.stats.in_process == RECORDS


async def test_requests_already_on_the_topic_are_not_overtaken(choreo_settings: ChoreoSettings) -> None:
    # Given requests for one SKU that an earlier owner left unread on its partition, and orders for the
    # same SKU placed before them (so a merge by time would take the orders first)
    await ensure_topics(choreo_settings)
    await publish_to(choreo_settings, ORDERS, [(f"new-{index}", "sku-x") for index in range(5)])
    await publish_to(choreo_settings, STOCK_REQUESTS, [("sku-x", f"old-{index}") for index in range(5)])
    # When a runner takes over every task
    runner = TransactionalRunner(choreo_settings, TwoStages())
    async with assigned(runner):
        logged = await eventually(lambda: read_topic(choreo_settings, AUDIT), lambda rows: len(rows) >= 10, timeout=60)
        # Then the SKU stage takes the old requests before the new ones, which went through the topic behind them
        assert [row.value.decode()[:3] for row in logged] == ["old"] * 5 + ["new"] * 5
        assert runner.stats.in_process == 0
        # And once the backlog is read, a new request is handed over
        await publish_to(choreo_settings, ORDERS, [("later", "sku-x")])
        await eventually(lambda: asyncio.sleep(0, runner.stats.in_process), lambda count: count == 1, timeout=60)
        assert partition_for(b"sku-x", choreo_settings.partitions) in runner.partitions


class Count(msgspec.Struct, frozen=True):
    seen: int


class Counting(Echo):
    """Copies every input record to the audit topic with how many its task has seen, kept in its state."""

    name = "counting"

    def process(self, task: TaskContext, message: Incoming) -> None:
        assert message.key is not None
        assert message.value is not None
        count = task.store.get("count", Count) or Count(0)
        task.store.put("count", Count(count.seen + 1))
        task.send(AUDIT, message.key.decode(), message.value + f"#{count.seen + 1}".encode())


def kept_count(runner: TransactionalRunner) -> int:
    """The records the runner's tasks have counted, or -1 while it owns none (taking them again)."""
    if not runner.partitions:
        return -1
    counts = [runner.store(partition).get("count", Count) for partition in runner.partitions]
    return sum(count.seen for count in counts if count is not None)


class FailsOnce:
    """A real producer of which one commit of records (the `fail_at`-th among every producer sharing
    `commits`) is reported failed. With `lands` it is committed first, as when the coordinator takes a
    commit and its answer is lost; without, nothing of it is sent."""

    def __init__(self, real: Transactions, lands: bool, commits: list[str], fail_at: int = 1) -> None:
        self._real = real
        self._lands = lands
        self._commits = commits
        self._fail_at = fail_at
        self.transactional_id = real.transactional_id

    async def start(self) -> None:
        await self._real.start()

    async def stop(self) -> None:
        await self._real.stop()

    async def commit(
        self, records: Sequence[Outgoing], offsets: Mapping[TopicPartition, tuple[int, str]], group_id: str
    ) -> list[Written]:
        if records:
            self._commits.append(self.transactional_id)
            if len(self._commits) == self._fail_at:
                if self._lands:
                    await self._real.commit(records, offsets, group_id)
                raise TransactionFailedError("no answer to the commit")
        return await self._real.commit(records, offsets, group_id)


def counting_with_a_failed_commit(
    settings: ChoreoSettings, lands: bool, commits: list[str], fail_at: int = 1
) -> TransactionalRunner:
    """A `Counting` runner whose producers fail the `fail_at`-th commit of records (see `FailsOnce`)."""
    return TransactionalRunner(
        settings,
        Counting(),
        make_transactions=lambda settings, transactional_id: FailsOnce(
            transactions(settings, transactional_id), lands, commits, fail_at
        ),
    )


@pytest.mark.parametrize("lands", [True, False], ids=["landed", "aborted"])
@pytest.mark.parametrize("client", ["aiokafka", "confluent"])
async def test_a_failed_commit_is_neither_lost_nor_repeated(
    choreo_settings: ChoreoSettings, lands: bool, client: str
) -> None:
    # Given a runner (on either consumer client) whose first commit of records fails, after landing or without
    choreo_settings = choreo_settings.model_copy(update={"consumer_client": client})
    await ensure_topics(choreo_settings)
    commits: list[str] = []
    runner = counting_with_a_failed_commit(choreo_settings, lands, commits)
    async with assigned(runner):
        # When records arrive
        await publish(choreo_settings, RECORDS)
        # Then the counts its tasks keep add up to the records (once it has resumed after the failure)
        await eventually(runner.lag, lambda behind: behind == 0, timeout=60)
        await eventually(lambda: asyncio.sleep(0, kept_count(runner)), lambda kept: kept == RECORDS, timeout=60)
        assert commits, "no commit failed"
        # And each record is copied once, with its task's count
        copied = await eventually(
            lambda: read_topic(choreo_settings, AUDIT), lambda rows: len(rows) >= RECORDS, timeout=60
        )
        assert sorted(row.value.split(b"#")[0] for row in copied) == sorted(
            f"v-{index}".encode() for index in range(RECORDS)
        )
        by_partition: dict[int, list[int]] = {}
        for row in copied:
            by_partition.setdefault(row.partition, []).append(int(row.value.split(b"#")[1]))
        assert all(sorted(seen) == list(range(1, len(seen) + 1)) for seen in by_partition.values())


def one_key_per_partition(partitions: int) -> list[str]:
    keys: dict[int, str] = {}
    index = 0
    while len(keys) < partitions:
        keys.setdefault(partition_for(f"first-{index}".encode(), partitions), f"first-{index}")
        index += 1
    return sorted(keys.values())


@pytest.mark.parametrize("lands", [True, False], ids=["landed", "aborted"])
async def test_a_commit_that_fails_as_its_partitions_are_revoked_is_neither_lost_nor_repeated(
    choreo_settings: ChoreoSettings, lands: bool
) -> None:
    # Given a runner that has committed a first record on every partition, then holds handled records
    # within its commit interval, and whose commit of them fails
    settings = choreo_settings.model_copy(update={"commit_interval": timedelta(minutes=10)})
    await ensure_topics(settings)
    commits: list[str] = []
    first = counting_with_a_failed_commit(settings, lands, commits, fail_at=2)
    second = TransactionalRunner(settings, Counting())
    firsts = one_key_per_partition(settings.partitions)
    running = [asyncio.create_task(first.run())]
    try:
        await asyncio.wait_for(first.wait_assigned(), 60)
        await publish_to(settings, ORDERS, [(key, key) for key in firsts])  # after a quiet interval: committed at once
        await eventually(lambda: read_topic(settings, AUDIT), lambda rows: len(rows) == len(firsts), timeout=60)
        await publish(settings, RECORDS)
        await eventually(first.lag, lambda behind: behind == 0, timeout=60)
        # When a second instance joins, and the first commits what it held as its partitions are revoked
        # (the first then takes some back, which its consumer starts to fetch before they are sought)
        running.append(asyncio.create_task(second.run()))
        # Then the two share the tasks, and the counts they keep add up to the records
        await eventually(
            lambda: asyncio.sleep(0, (kept_count(first), kept_count(second))),
            lambda kept: min(kept) >= 0 and sum(kept) == RECORDS + len(firsts),
            timeout=90,
        )
        assert len(commits) >= 2, "the commit at the revocation never came"
        # And, once both have stopped (committing what they hold), each record is copied once
        first.stop()
        second.stop()
        await asyncio.wait_for(asyncio.gather(*running), 60)
        copied = await eventually(lambda: read_topic(settings, AUDIT), lambda rows: len(rows) >= RECORDS + len(firsts))
        assert sorted(row.value.split(b"#")[0] for row in copied) == sorted(
            [key.encode() for key in firsts] + [f"v-{index}".encode() for index in range(RECORDS)]
        )
    finally:
        first.stop()
        second.stop()
        await asyncio.wait_for(asyncio.gather(*running), 60)

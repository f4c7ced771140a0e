"""Exactly-once consume → handle → produce, with keyed state kept in a compacted changelog.

The plumbing every stateful service shares; services supply only a `StreamApp` (what to read,
how to react). The unit of work is a *task*: partition number `p` of every input topic and of
the service's changelog. All order-keyed topics share one partition count, so a task owns every
event of its orders, and its state can never be split between instances.

Each task has its own transactional producer (`<group>-task-<p>`). Input offsets, output events
and state changes of a batch commit in one Kafka transaction, or not at all. aiokafka speaks
only v0 of the transaction calls (no consumer-group fencing, KIP-447), so the stable
per-task transactional id is what fences a zombie: whoever starts the task's producer last
aborts the previous owner's open transaction and makes its later commits fail.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError, ProducerFenced
from pydantic import BaseModel

from schemas.deadletter import DeadLetter
from schemas.envelope import Envelope
from schemas.topics import DEAD_LETTER, Topic, topic_of
from services.common.kafka import consumer as make_consumer
from services.common.kafka import producer as make_producer
from services.common.settings import ChoreoSettings

log = logging.getLogger(__name__)

Model = TypeVar("Model", bound=BaseModel)

FETCH_MAX_WAIT_MS = 100
# The broker answers CONCURRENT_TRANSACTIONS while it still writes the previous commit's markers;
# retrying after the default 100 ms would add that much to every hop.
TRANSACTION_RETRY_BACKOFF_MS = 20
# A whole batch's records for one partition fit one producer batch: with the default 16 KiB a
# busy task's sends waited for earlier batches to drain, one produce round trip at a time.
TASK_BATCH_BYTES = 512 * 1024


class TaskFencedError(RuntimeError):
    """This instance lost a task to a newer owner while it was stalled; it must restart."""


@dataclass(frozen=True)
class Incoming:
    """One record as read, with the registry topic it came from."""

    topic: Topic
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


@dataclass(frozen=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None


class StreamApp(Protocol):
    """What a service plugs into the runner: its inputs, its changelog and its reactions."""

    name: str
    inputs: Sequence[Topic]
    changelog: Topic

    def process(self, task: TaskContext, message: Incoming) -> None: ...

    def tick(self, task: TaskContext, now: datetime) -> None:
        """Called periodically per task, inside a transaction: time-driven work such as deadlines."""


class KeyedStore:
    """A task's state: JSON documents by key, mirrored to its changelog partition on commit."""

    def __init__(self) -> None:
        self._raw: dict[str, bytes] = {}
        self._decoded: dict[str, BaseModel] = {}
        self._dirty: dict[str, bytes | None] = {}
        self._before: dict[str, bytes | None] = {}

    def restore(self, key: str, value: bytes | None) -> None:
        self._decoded.pop(key, None)
        if value is None:
            self._raw.pop(key, None)
        else:
            self._raw[key] = value

    def get(self, key: str, model: type[Model]) -> Model | None:
        cached = self._decoded.get(key)
        if isinstance(cached, model):
            return cached
        raw = self._raw.get(key)
        if raw is None:
            return None
        value = model.model_validate_json(raw)
        self._decoded[key] = value
        return value

    def put(self, key: str, value: BaseModel) -> None:
        raw = value.model_dump_json().encode()
        self._remember(key)
        self._raw[key] = raw
        self._decoded[key] = value
        self._dirty[key] = raw

    def delete(self, key: str) -> None:
        self._remember(key)
        self._raw.pop(key, None)
        self._decoded.pop(key, None)
        self._dirty[key] = None

    def keys(self) -> list[str]:
        return list(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def pending_changes(self) -> dict[str, bytes | None]:
        return dict(self._dirty)

    def commit(self) -> None:
        self._dirty, self._before = {}, {}

    def rollback(self) -> None:
        """Forget the changes not yet committed."""
        for key, value in self._before.items():
            self.restore(key, value)
        self._dirty, self._before = {}, {}

    def _remember(self, key: str) -> None:
        if key not in self._before:
            self._before[key] = self._raw.get(key)


@dataclass
class TaskContext:
    """What a handler may touch while processing one task's batch."""

    partition: int
    settings: ChoreoSettings
    service: str
    store: KeyedStore
    outbox: list[Outgoing] = field(default_factory=list)

    def emit(self, envelope: Envelope) -> None:
        """Publish a contract event on the saga topic the registry assigns to its type."""
        topic = self.settings.topic(topic_of(type(envelope.data)))
        self.outbox.append(Outgoing(topic, envelope.key, envelope.to_bytes()))

    def send(self, topic: Topic, key: str, value: bytes) -> None:
        """Publish an internal message (not an envelope) keyed by `key`."""
        self.outbox.append(Outgoing(self.settings.topic(topic), key.encode(), value))

    def dead_letter(self, message: Incoming, reason: str) -> None:
        record = DeadLetter(
            reason=reason,
            topic=self.settings.topic(message.topic),
            partition=message.partition,
            offset=message.offset,
            key_base64=_b64(message.key),
            value_base64=_b64(message.value),
            consumer=self.service,
            dead_lettered_at=datetime.now(UTC),
        )
        log.warning(
            "dead-lettered a message",
            extra={"topic": record.topic, "partition": record.partition, "offset": record.offset, "reason": reason},
        )
        self.outbox.append(Outgoing(self.settings.topic(DEAD_LETTER), message.key, record.to_bytes()))


def _b64(raw: bytes | None) -> str | None:
    return base64.b64encode(raw).decode() if raw is not None else None


@dataclass
class _Task:
    partition: int
    producer: AIOKafkaProducer
    store: KeyedStore


@dataclass
class RunnerStats:
    batches: int = 0
    records: int = 0
    restored_records: int = 0
    started_at: float = field(default_factory=time.monotonic)


class TransactionalRunner:
    """Runs a `StreamApp` until stopped: one consumer, one transactional producer per owned task."""

    def __init__(
        self,
        settings: ChoreoSettings,
        app: StreamApp,
        *,
        tick_interval: float = 1.0,
        max_batch: int = 2000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.app = app
        self.tick_interval = tick_interval
        self.max_batch = max_batch
        self.clock = clock
        self.group_id = settings.group(app.name)
        self.stats = RunnerStats()
        self._tasks: dict[int, _Task] = {}
        self._topics_by_name = {settings.topic(topic): topic for topic in app.inputs}
        self._consumer: AIOKafkaConsumer | None = None
        self._work_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._assigned = asyncio.Event()
        self._last_tick = 0.0

    @property
    def ready(self) -> bool:
        return self._assigned.is_set() and not self._stopping.is_set()

    @property
    def partitions(self) -> list[int]:
        return sorted(self._tasks)

    def store(self, partition: int) -> KeyedStore:
        return self._tasks[partition].store

    async def run(self) -> None:
        consumer = make_consumer(
            self.settings,
            group_id=self.group_id,
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_records=self.max_batch,
            # A saga is a chain of hops; a short fetch wait keeps each hop's latency low.
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        self._consumer = consumer
        consumer.subscribe(list(self._topics_by_name), listener=_Rebalance(self))
        await consumer.start()
        log.info("service started", extra={"service": self.app.name, "group": self.group_id})
        try:
            while not self._stopping.is_set():
                # Wait no longer than the next tick is due, so timers fire on time under any load.
                until_tick = self._last_tick + self.tick_interval - time.monotonic()
                batch = await consumer.getmany(timeout_ms=max(0, int(until_tick * 1000)))
                async with self._work_lock:
                    await self._process(batch)
                    await self._maybe_tick()
        finally:
            async with self._work_lock:
                await self._close_tasks(list(self._tasks))
            await consumer.stop()
            log.info("service stopped", extra={"service": self.app.name})

    def stop(self) -> None:
        self._stopping.set()

    async def lag(self) -> int:
        """Records committed on the inputs but not yet processed by this instance."""
        consumer = self._consumer
        if consumer is None or not self._assigned.is_set():
            return -1
        assignment = list(consumer.assignment())
        ends = await consumer.end_offsets(assignment)
        behind = 0
        for tp in assignment:
            behind += max(0, ends[tp] - await consumer.position(tp))
        return behind

    async def wait_assigned(self) -> None:
        await self._assigned.wait()

    # --- batches ------------------------------------------------------------------------------

    async def _process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        by_task: dict[int, dict[TopicPartition, list[Any]]] = {}
        for tp, records in batch.items():
            if records and tp.partition in self._tasks:
                by_task.setdefault(tp.partition, {})[tp] = records
        # Tasks share nothing (own producer, own state, own partitions), so their transactions
        # run concurrently: a batch costs one transaction's round trips, not one per partition.
        await asyncio.gather(
            *(
                self._in_transaction(
                    partition,
                    functools.partial(self._handle_records, records=task_records),
                    offsets={tp: rows[-1].offset + 1 for tp, rows in task_records.items()},
                )
                for partition, task_records in by_task.items()
            )
        )
        self.stats.batches += len(by_task)
        self.stats.records += sum(len(rows) for task_records in by_task.values() for rows in task_records.values())

    def _handle_records(self, context: TaskContext, records: dict[TopicPartition, list[Any]]) -> None:
        # One task reads several topics; merging them by record timestamp (each partition stays in
        # offset order) lets a service see an order's events in the order they happened whenever
        # they arrive in one batch, as Kafka Streams does.
        streams = [
            [(row.timestamp, index, tp, row) for row in rows] for index, (tp, rows) in enumerate(records.items())
        ]
        for _timestamp, _index, tp, row in heapq.merge(*streams, key=lambda item: (item[0], item[1])):
            message = Incoming(
                self._topics_by_name[tp.topic], tp.partition, row.offset, row.key, row.value, row.timestamp
            )
            try:
                self.app.process(context, message)
            except Exception as error:  # a handler bug must not block the partition: keep the message
                log.exception("handler failed", extra={"service": self.app.name, "offset": row.offset})
                context.dead_letter(message, f"handler error: {error!r}")

    async def _maybe_tick(self) -> None:
        now = time.monotonic()
        if now - self._last_tick < self.tick_interval:
            return
        self._last_tick = now
        now_utc = self.clock()
        await asyncio.gather(
            *(
                self._in_transaction(partition, lambda context: self.app.tick(context, now_utc), offsets={})
                for partition in list(self._tasks)
            )
        )

    async def _in_transaction(
        self,
        partition: int,
        work: Callable[[TaskContext], None],
        offsets: dict[TopicPartition, int],
    ) -> None:
        task = self._tasks[partition]
        context = TaskContext(partition, self.settings, self.app.name, task.store)
        work(context)
        changes = task.store.pending_changes()
        if not context.outbox and not changes and not offsets:
            return
        try:
            async with task.producer.transaction():
                deliveries = [
                    await task.producer.send(out.topic, out.value, key=out.key, partition=out.partition)
                    for out in context.outbox
                ]
                changelog = self.settings.topic(self.app.changelog)
                deliveries += [
                    await task.producer.send(changelog, value, key=key.encode(), partition=partition)
                    for key, value in changes.items()
                ]
                if offsets:
                    await task.producer.send_offsets_to_transaction(offsets, self.group_id)
                # Every record's outcome is read here, so a failed send fails this transaction
                # (and is never left as an unobserved error).
                await asyncio.gather(*deliveries)
        except ProducerFenced as error:
            # Another instance took this task over while we were stalled: we are a zombie. Our
            # transaction is void; the only safe course is to stop and start again from the group.
            task.store.rollback()
            await self._close_tasks([partition])
            raise TaskFencedError(f"{self.app.name} task {partition} was fenced by a newer owner") from error
        except KafkaError:
            # The transaction was aborted: start the task afresh from what was committed.
            log.exception(
                "transaction failed; reopening task", extra={"service": self.app.name, "partition": partition}
            )
            task.store.rollback()
            await self._close_tasks([partition])
            await self._open_tasks([partition])
            await self._rewind(partition)
            return
        task.store.commit()

    async def _rewind(self, partition: int) -> None:
        """Move the consumer back to the committed offsets of the task's inputs, to redo an aborted batch."""
        consumer = self._consumer
        assert consumer is not None
        for tp in consumer.assignment():
            if tp.partition != partition:
                continue
            committed = await consumer.committed(tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)

    # --- task lifecycle -----------------------------------------------------------------------

    async def _open_tasks(self, partitions: Sequence[int]) -> None:
        new = [partition for partition in partitions if partition not in self._tasks]
        if not new:
            return
        # Starting a task's producer fences its previous owner and settles that owner's open
        # transaction, so what we then read back from the changelog is exactly what was committed.
        # The consumer resumes from the committed offsets itself; should it read them a moment
        # before a zombie's last commit completes, reprocessing derives the same event ids and
        # every consumer deduplicates on them.
        producers = [
            make_producer(
                self.settings,
                transactional_id=f"{self.group_id}-task-{partition}",
                linger_ms=2,
                retry_backoff_ms=TRANSACTION_RETRY_BACKOFF_MS,
                max_batch_size=TASK_BATCH_BYTES,
            )
            for partition in new
        ]
        await asyncio.gather(*(producer.start() for producer in producers))
        stores = await self._restore(new)
        for partition, producer in zip(new, producers, strict=True):
            self._tasks[partition] = _Task(partition, producer, stores[partition])

    async def _restore(self, partitions: Sequence[int]) -> dict[int, KeyedStore]:
        changelog = self.settings.topic(self.app.changelog)
        stores = {partition: KeyedStore() for partition in partitions}
        tps = [TopicPartition(changelog, partition) for partition in partitions]
        reader = make_consumer(self.settings, group_id=None, enable_auto_commit=False)
        await reader.start()
        count = 0
        try:
            reader.assign(tps)
            ends = await reader.end_offsets(tps)
            await reader.seek_to_beginning(*tps)
            pending = {tp for tp in tps if ends[tp] > 0}
            while pending:
                batch = await reader.getmany(*pending, timeout_ms=500)
                for tp, records in batch.items():
                    for record in records:
                        stores[tp.partition].restore(record.key.decode(), record.value)
                    count += len(records)
                pending = {tp for tp in pending if await reader.position(tp) < ends[tp]}
        finally:
            await reader.stop()
        self.stats.restored_records += count
        log.info(
            "restored task state",
            extra={"service": self.app.name, "partitions": list(partitions), "records": count},
        )
        return stores

    async def _close_tasks(self, partitions: Sequence[int]) -> None:
        for partition in partitions:
            task = self._tasks.pop(partition, None)
            if task is not None:
                await task.producer.stop()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: TransactionalRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Waiting for the lock lets an in-flight batch commit before its task is handed over.
        async with self.runner._work_lock:
            await self.runner._close_tasks(sorted({tp.partition for tp in revoked}))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        async with self.runner._work_lock:
            await self.runner._open_tasks(sorted({tp.partition for tp in assigned}))
        self.runner._assigned.set()
        log.info(
            "partitions assigned",
            extra={"service": self.runner.app.name, "partitions": self.runner.partitions},
        )

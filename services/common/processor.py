"""Exactly-once consume → handle → produce, with keyed state kept in a compacted changelog.

The plumbing every stateful service shares; services supply only a `StreamApp` (what to read,
how to react). The unit of state is a *task*: partition number `p` of every input topic and of
the service's changelog. All order-keyed topics share one partition count, so a task owns every
event of its orders, and its state can never be split between instances.

An instance commits everything it did since its last commit (input offsets, output events and
state changes of all its tasks) in one Kafka transaction, or nothing of it. The broker's cost
follows the number of transactions, not of records, so one transaction per poll rather than one
per task is what lets throughput grow with load.

aiokafka speaks only v0 of the transaction calls (no consumer-group fencing, KIP-447), so fencing
is done by hand: each assignment gets a fresh transactional id, its first commit tags every
owned offset with it (later commits, the offsets they move), and a new owner of a partition first
starts a producer with the id it finds there. That aborts the earlier owner's open transaction and
makes its later commits fail.

A request between two stages of a service (an order's task asks a SKU's or a customer's task) is
handed over in process when this instance owns the target task and has read everything already on
the target partition: it then lands in the same transaction as the record that caused it, with no
topic record, broker round trip or wait for a commit in between. Otherwise it goes through its
topic, and the order of each order's requests is kept either way (see `_Handover`).
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition
from confluent_kafka import KafkaException
from opentelemetry.trace import TracerProvider

from schemas.deadletter import DeadLetter
from schemas.envelope import Envelope
from schemas.topics import DEAD_LETTER, Topic, topic_of
from services.common.cadence import CommitCadence
from services.common.deadletters import dead_letter_headers
from services.common.heap import HeapTrimmer, glibc_malloc_trim
from services.common.kafka import admin_client as make_admin
from services.common.kafka import consumer as make_consumer
from services.common.kafka import offsets_settled, partition_for, topic_config
from services.common.metrics import MeteredApp, RunnerMetrics, Tally
from services.common.runner_consumer import RunnerConsumer, runner_consumer
from services.common.settings import ChoreoSettings
from services.common.stack import run_dir
from services.common.state import ChangelogRecord, Checkpoint, KeyedStore
from services.common.state.rocks import RocksMemory
from services.common.state.stores import StoreFactory, restore_start, store_factory
from services.common.tracing import Tracing
from services.common.transactions import (
    FencedError,
    Outgoing,
    TransactionFailedError,
    Transactions,
    Written,
    fence,
    transactions,
)

log = logging.getLogger(__name__)

FORWARDED_FROM_HEADER = "choreo-forwarded-from"
"""On a client record sent on to its key's partition: `<partition>:<offset>` where it was first written."""
EXPIRES_AT_HEADER = "choreo-expires-at"
"""On a changelog record: when its key expires (epoch ms); the store's expiry index is rebuilt from it."""
# Expired keys deleted per task and tick: a backlog drains over a few ticks instead of one huge transaction.
EXPIRY_SWEEP_LIMIT = 1000
# Kafka's default delete.retention.ms, used when the changelog's own setting cannot be read.
DEFAULT_DELETE_RETENTION_MS = 86_400_000

# Fencing earlier owners normally takes well under a second; far longer means a broker call
# hangs, and a member that never finishes its assignment holds its partitions hostage.
FENCE_TIMEOUT_S = 60.0
# How long to wait for a commit of the positions to be written out before their tags are read again.
SETTLED_WAIT_S = 5.0
ASSIGNMENT_POLL_S = 0.05
IN_PROCESS_OFFSET = -1
"""The offset of a record handed over in process: it was never written to its topic."""


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
    headers: tuple[tuple[str, bytes], ...] = ()

    @property
    def in_process(self) -> bool:
        """Handed over by a stage of this instance rather than read from its topic."""
        return self.offset == IN_PROCESS_OFFSET

    def header(self, name: str) -> bytes | None:
        """The first header called `name`, if any."""
        for found, value in self.headers:
            if found == name:
                return value
        return None


class StreamApp(Protocol):
    """What a service plugs into the runner: its inputs, its changelog and its reactions."""

    name: str
    inputs: Sequence[Topic]
    changelog: Topic
    in_process: Sequence[Topic]
    """Inputs that one stage sends another (requests and replies): what may be handed over in process."""
    mostly_skipped: Sequence[Topic]
    """Inputs read for a rare event type among many others: fetched once per commit interval while a commit
    waits for something to act on, not at each arrival (`services.common.held_fetches`)."""

    def process(self, task: TaskContext, message: Incoming) -> None: ...

    def tick(self, task: TaskContext, now: datetime) -> None:
        """Called periodically per task, inside a transaction: time-driven work such as deadlines."""


@dataclass
class TaskContext:
    """What a handler may touch while processing one task's batch."""

    partition: int
    settings: ChoreoSettings
    service: str
    store: KeyedStore
    outbox: list[Outgoing] = field(default_factory=list)
    stream_time_ms: int = 0
    """The latest record timestamp this task has processed (or the clock, in a tick): what expiry follows."""
    tracing: Tracing = field(default_factory=Tracing)
    """Spans of the runner; a timer that emits for an order opens one with `tracing.timer`."""
    tally: Tally = field(default_factory=Tally)
    """What this batch did that metrics count once its transaction commits."""

    @property
    def retention_ms(self) -> int:
        return int(self.settings.order_retention.total_seconds() * 1000)

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the transaction carrying this batch has committed; never if it aborts."""
        self.tally.callbacks.append(callback)

    def mark(self, outcome: str) -> None:
        """What became of the record being processed when it was not simply handled (`services.common.metrics`)."""
        self.tally.mark(outcome)

    def emit(self, envelope: Envelope, encoded: str | None = None) -> None:
        """Publish a contract event on the saga topic the registry assigns to its type; `encoded`, when
        given, is the envelope's JSON already (what a handler recorded it as), so it is not serialized again."""
        topic = self.settings.topic(topic_of(type(envelope.data)))
        value = encoded.encode() if encoded is not None else envelope.to_bytes()
        self.outbox.append(Outgoing(topic, envelope.key, value, headers=envelope.headers()))

    def send(self, topic: Topic, key: str, value: bytes) -> None:
        """Publish an internal message (not an envelope) keyed by `key`."""
        self.outbox.append(Outgoing(self.settings.topic(topic), key.encode(), value))

    def forward(self, message: Incoming, partition: int) -> None:
        """Send a record on, unchanged, to `partition` of the topic it was read from."""
        origin = (FORWARDED_FROM_HEADER, f"{message.partition}:{message.offset}".encode())
        topic = self.settings.topic(message.topic)
        self.outbox.append(Outgoing(topic, message.key, message.value, partition, (*message.headers, origin)))

    def dead_letter(self, message: Incoming, reason: str) -> None:
        self.tally.dead_lettered(message, reason)
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
        headers = dead_letter_headers(record, message.headers, message.timestamp_ms)
        self.outbox.append(Outgoing(self.settings.topic(DEAD_LETTER), message.key, record.to_bytes(), headers=headers))


def _expiry_headers(record: ChangelogRecord) -> list[tuple[str, bytes]]:
    if record.expires_at_ms is None or record.value is None:
        return []
    return [(EXPIRES_AT_HEADER, str(record.expires_at_ms).encode())]


def _changelog_record(record: Any) -> ChangelogRecord:
    expires_at_ms = None
    for name, value in record.headers or ():
        if name == EXPIRES_AT_HEADER:
            expires_at_ms = int(value)
    return ChangelogRecord(record.key.decode(), record.value, expires_at_ms)


def state_root(settings: ChoreoSettings) -> Path:
    """The folder of this machine's task stores: `CHOREO_STATE_DIR`, or `state/` in the run folder."""
    return settings.state_dir if settings.state_dir is not None else run_dir() / "state"


def _b64(raw: bytes | None) -> str | None:
    return base64.b64encode(raw).decode() if raw is not None else None


@dataclass
class RunnerStats:
    reads: int = 0
    """Polls of the consumer that brought records."""
    batches: int = 0
    """A task's records of one read."""
    records: int = 0
    transactions: int = 0
    restored_records: int = 0
    restore_seconds: float = 0.0
    full_restores: int = 0
    expired_keys: int = 0
    in_process: int = 0
    """Requests handed over in process instead of through their topic."""
    started_at: float = field(default_factory=time.monotonic)


class TransactionalRunner:
    """Runs a `StreamApp` until stopped: one consumer, one transactional producer per assignment."""

    def __init__(
        self,
        settings: ChoreoSettings,
        app: StreamApp,
        *,
        tick_interval: float = 1.0,
        max_batch: int = 2000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        heap: HeapTrimmer | None = None,
        tracer_provider: TracerProvider | None = None,
        metrics: RunnerMetrics | None = None,
        make_transactions: Callable[[ChoreoSettings, str], Transactions] = transactions,
    ) -> None:
        self.settings = settings
        self._make_transactions = make_transactions
        self.app = app
        self.tick_interval = tick_interval
        self.max_batch = max_batch
        self.clock = clock
        self.group_id = settings.group(app.name)
        self.stats = RunnerStats()
        self.metrics = metrics if metrics is not None else RunnerMetrics(app.name)
        self.metrics.follow(app.inputs, self.partition_lag)
        # Every record is tallied with its outcome around the service's own handling.
        self.app = MeteredApp(app)
        self._stores: dict[int, KeyedStore] = {}
        self._stream_time: dict[int, int] = {}
        self._topics_by_name = {settings.topic(topic): topic for topic in app.inputs}
        self._in_process = {settings.topic(topic): topic for topic in app.in_process}
        self._handover = _Handover()
        self._consumer: RunnerConsumer | None = None
        self._producer: Transactions | None = None
        self._transactional_id = ""
        # Unique per process start: a restarted or second instance never shares ids with this one.
        self._incarnation = uuid.uuid4().hex[:12]
        self._store_factory: StoreFactory = store_factory(
            settings.state_store, state_root(settings) / self.group_id, self._incarnation, int(settings.state_memory)
        )
        self._assignments = 0
        self._positions: dict[TopicPartition, int] = {}
        self._tagged = False
        """Whether a commit of this assignment has tagged every owned position yet."""
        self._cadence = CommitCadence(settings.commit_interval.total_seconds())
        self._paced_reads = settings.paced_reads
        # Handled but not yet committed: what the next transaction carries.
        self._pending: dict[int, TaskContext] = {}
        self._pending_offsets: dict[TopicPartition, int] = {}
        self._pending_records = 0
        self._work_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._assigned = asyncio.Event()
        self._last_tick = 0.0
        self._failure: Exception | None = None
        self.heap = heap if heap is not None else HeapTrimmer(glibc_malloc_trim())
        self.tracing = Tracing(tracer_provider)

    @property
    def ready(self) -> bool:
        return self._assigned.is_set() and not self._stopping.is_set()

    @property
    def partitions(self) -> list[int]:
        return sorted(self._stores)

    @property
    def transactional_id(self) -> str:
        return self._transactional_id

    def store(self, partition: int) -> KeyedStore:
        return self._stores[partition]

    @property
    def rocks_memory(self) -> RocksMemory | None:
        return self._store_factory.rocks_memory

    async def run(self) -> None:
        consumer = runner_consumer(self.settings, self.group_id, self.max_batch)
        self._consumer = consumer
        await consumer.start(list(self._topics_by_name), _Rebalance(self))
        if self.settings.held_fetches:
            consumer.hold_fetches(
                self._cadence.fetch_deadline,
                mostly_skipped={self.settings.topic(topic) for topic in self.app.mostly_skipped},
                skipped_every_s=self._cadence.interval_s,
            )
        log.info("service started", extra={"service": self.app.name, "group": self.group_id})
        try:
            while not self._stopping.is_set():
                if self._producer is None:
                    # Between a revocation and the next assignment: let the group protocol run.
                    batch = await consumer.between_assignments(ASSIGNMENT_POLL_S)
                    if batch:
                        async with self._work_lock:
                            await self._process(batch)
                    continue
                # Wait no longer than the next tick (or commit) is due, so timers fire on time under any load.
                wait = self._last_tick + self.tick_interval - time.monotonic()
                commit_due = self._commit_due()
                if commit_due is not None:
                    wait = min(wait, commit_due - time.monotonic())
                    if self._paced_reads and wait > 0 and self._has_effects():
                        # What arrives meanwhile would wait for the same commit: read it all when it is due.
                        await asyncio.sleep(wait)
                        wait = 0.0
                # Rounded up: a wait rounded down to 0 ms would poll again and again until the commit is due.
                batch = await consumer.getmany(timeout_ms=math.ceil(max(0.0, wait) * 1000))
                async with self._work_lock:
                    await self._process(batch)
                self.heap.trim_if_due()
            if self._failure is None:
                async with self._work_lock:
                    if self._producer is not None:
                        await self._flush()
        finally:
            async with self._work_lock:
                await self._release_assignment()
            await consumer.stop()
            log.info("service stopped", extra={"service": self.app.name})
        if self._failure is not None:
            raise RuntimeError(f"{self.app.name} stopped: {self._failure!r}") from self._failure

    def stop(self) -> None:
        self._stopping.set()

    def _fail(self, error: Exception) -> None:
        log.error("could not take an assignment", exc_info=error, extra={"service": self.app.name})
        self._failure = error
        self.stop()

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

    def partition_lag(self) -> list[tuple[str, int, int]]:
        """(registry topic, partition, records behind) of each owned input partition, as last fetched."""
        consumer = self._consumer
        if consumer is None or self._producer is None:
            return []
        return [
            (self._topics_by_name[tp.topic].name, tp.partition, behind)
            for tp, behind in consumer.fetched_lag()
            if tp.topic in self._topics_by_name and tp.partition in self._stores
        ]

    async def wait_assigned(self) -> None:
        await self._assigned.wait()

    # --- batches ------------------------------------------------------------------------------

    async def _process(self, batch: dict[TopicPartition, list[Any]]) -> None:
        consumer = self._consumer
        if self._producer is None or consumer is None:
            return
        started = time.perf_counter()
        by_task: dict[int, dict[TopicPartition, list[Any]]] = {}
        for tp, fetched in batch.items():
            rows = self._unread(tp, fetched)
            if rows:
                self._pending_offsets[tp] = rows[-1].offset + 1
                self._pending_records += len(rows)
                by_task.setdefault(tp.partition, {})[tp] = rows
        for partition, task_records in by_task.items():
            self._handle_records(self._context(self._pending, partition), task_records)
        if time.monotonic() - self._last_tick >= self.tick_interval:
            self._last_tick = time.monotonic()
            now = self.clock()
            for partition in list(self._stores):
                context = self._context(self._pending, partition)
                context.stream_time_ms = max(context.stream_time_ms, int(now.timestamp() * 1000))
                self._expire(context)
                sent = len(context.outbox)
                self.app.tick(context, now)
                self._dispatch(self._hand_over(context, sent))
        self.stats.batches += len(by_task)
        self.stats.reads += bool(by_task)
        if by_task:
            self.metrics.batch_handled(started)
        if self._handover.backlogged:
            for tp in list(self._handover.backlogged):
                self._handover.positioned(tp, await consumer.position(tp))
        commit_due = self._commit_due()
        if (commit_due is not None and time.monotonic() >= commit_due) or self._pending_records >= self.max_batch:
            await self._flush()

    def _commit_due(self) -> float | None:
        """When what was handled since the last commit is to be committed (monotonic); None if nothing was
        (`services.common.cadence`)."""
        if not self._pending and not self._pending_offsets:
            return None
        return self._cadence.due(effects=self._has_effects())

    def _has_effects(self) -> bool:
        """Whether the open transaction does anything: records to send, state changes or work after it commits."""
        return any(
            context.outbox or context.store.dirty or context.tally.callbacks for context in self._pending.values()
        )

    def _unread(self, tp: TopicPartition, rows: list[Any]) -> list[Any]:
        """What of `rows` this assignment has not read yet.

        aiokafka starts fetching a new assignment from its own reading of the committed offsets while
        the listener is still taking it, so a batch fetched then arrives before the listener's seek and
        the same records again after it. Records of a partition not (yet) taken are dropped: the seek
        that takes it reads them again.
        """
        if not rows or tp.partition not in self._stores:
            return []
        # The next to read: past what was handled since the last commit, else the committed position
        # (none yet: whatever comes first).
        expected = self._pending_offsets.get(tp, self._positions.get(tp))
        if expected is not None and rows[0].offset < expected:
            return [row for row in rows if row.offset >= expected]
        return rows

    async def _flush(self, *, retake: bool = True) -> None:
        """Commit what was handled since the last commit (at once, whatever the interval)."""
        contexts, offsets, records = self._pending, self._pending_offsets, self._pending_records
        self._pending, self._pending_offsets, self._pending_records = {}, {}, 0
        if contexts or offsets:
            await self._commit(contexts, offsets, retake=retake)
            self.stats.records += records

    def _context(self, contexts: dict[int, TaskContext], partition: int) -> TaskContext:
        context = contexts.get(partition)
        if context is None:
            context = TaskContext(
                partition,
                self.settings,
                self.app.name,
                self._stores[partition],
                stream_time_ms=self._stream_time.get(partition, 0),
                tracing=self.tracing,
            )
            contexts[partition] = context
        return context

    def _expire(self, context: TaskContext) -> None:
        """Delete what has expired by the task's stream time (a tombstone on the changelog each)."""
        for key in context.store.due(context.stream_time_ms, EXPIRY_SWEEP_LIMIT):
            context.store.delete(key)
            self.stats.expired_keys += 1

    def _handle_records(self, context: TaskContext, records: dict[TopicPartition, list[Any]]) -> None:
        # One task reads several topics; merging them by record timestamp (each partition stays in
        # offset order) lets a service see an order's events in the order they happened whenever
        # they arrive in one batch, as Kafka Streams does.
        streams = [
            [(row.timestamp, index, tp, row) for row in rows] for index, (tp, rows) in enumerate(records.items())
        ]
        for _timestamp, _index, tp, row in heapq.merge(*streams, key=lambda item: (item[0], item[1])):
            message = Incoming(
                self._topics_by_name[tp.topic], tp.partition, row.offset, row.key, row.value, row.timestamp,
                tuple(row.headers or ()),
            )  # fmt: skip
            self._dispatch([(context, message)])
            if tp.topic in self._in_process:
                self._handover.read(tp, row.offset)

    def _dispatch(self, work: Iterable[tuple[TaskContext, Incoming]]) -> None:
        """Process each message, then the requests it sent that an own task can take at once."""
        queue = deque(work)
        while queue:
            context, message = queue.popleft()
            context.stream_time_ms = max(context.stream_time_ms, message.timestamp_ms)
            sent = len(context.outbox)
            traced = self.tracing.processing(context, message)
            try:
                self.app.process(context, message)
            except Exception as error:  # a handler bug must not block the partition: keep the message
                log.exception("handler failed", extra={"service": self.app.name, "offset": message.offset})
                context.dead_letter(message, f"handler error: {error!r}")
            self.tracing.finished(traced, context, sent)
            queue.extend(self._hand_over(context, sent))

    def _hand_over(self, context: TaskContext, sent: int) -> list[tuple[TaskContext, Incoming]]:
        """Take out of `context.outbox[sent:]` the requests an own, caught-up task can process now."""
        if not self._in_process:
            return []
        kept: list[Outgoing] = []
        handed: list[tuple[TaskContext, Incoming]] = []
        for out in context.outbox[sent:]:
            topic = self._in_process.get(out.topic)
            if topic is None or out.key is None:
                kept.append(out)
                continue
            partition = out.partition if out.partition is not None else partition_for(out.key, self.settings.partitions)
            tp = TopicPartition(out.topic, partition)
            if partition in self._stores and self._handover.caught_up(tp):
                message = Incoming(
                    topic, partition, IN_PROCESS_OFFSET, out.key, out.value, context.stream_time_ms, out.headers
                )
                handed.append((self._context(self._pending, partition), message))
            else:
                self._handover.sending(tp)
                kept.append(out)
        if handed:
            context.outbox[sent:] = kept
            self.stats.in_process += len(handed)
        return handed

    async def _commit(
        self, contexts: dict[int, TaskContext], offsets: dict[TopicPartition, int], *, retake: bool = True
    ) -> None:
        """One transaction for everything this instance did since the last one, or nothing of it.

        After a failed one the assignment is taken again (`retake`), unless it is being given up anyway.
        """
        producer = self._producer
        assert producer is not None
        changes = {partition: self._stores[partition].pending_records() for partition in contexts}
        if not offsets and not any(changes.values()) and not any(context.outbox for context in contexts.values()):
            return
        positions = {**self._positions, **offsets}
        # The first commit of an assignment tags every owned position with this producer's id; a
        # position that has not moved since keeps that tag, so later commits carry only what moved.
        tagged = offsets if self._tagged else positions
        changelog = self.settings.topic(self.app.changelog)
        records: list[Outgoing] = []
        requests: list[int] = []  # where in `records` the requests sent through their topic are
        last_changelog_write: dict[int, int] = {}
        for partition, context in contexts.items():
            requests += [len(records) + i for i, out in enumerate(context.outbox) if out.topic in self._in_process]
            records += context.outbox
            records += [
                Outgoing(changelog, record.key.encode(), record.value, partition, tuple(_expiry_headers(record)))
                for record in changes[partition]
            ]
            if changes[partition]:
                last_changelog_write[partition] = len(records) - 1
        began = time.monotonic()
        try:
            # Whoever takes a partition over reads from the tag which producer it must fence.
            written = await self._send_commit(
                producer, records, {tp: (offset, self._transactional_id) for tp, offset in tagged.items()}
            )
        except FencedError as error:
            # Another instance took our partitions over while we were stalled: we are a zombie. Our
            # transaction is void; the only safe course is to stop and start again from the group.
            fenced = TaskFencedError(f"{self.app.name} ({self._transactional_id}) was fenced by a newer owner")
            # Kept as well as raised: met in a rebalance listener, the error would end with aiokafka's log.
            self._failure = fenced
            self.metrics.fenced.labels(self.app.name).inc()
            self._rollback()
            self.stop()  # and take no new assignment while the consumer leaves the group
            await self._release_assignment()
            raise fenced from error
        except TransactionFailedError:
            # A failed commit may still land: the coordinator can take the commit and its answer be
            # lost. Redoing the batch from memory would then write it twice, so the stores and positions
            # are read again from the broker, once the failed producer is fenced (which settles its
            # transaction either way).
            log.exception("transaction failed; resuming from what was committed", extra={"service": self.app.name})
            self.metrics.aborts.labels(self.app.name).inc()
            self._rollback()
            consumer = self._consumer
            if retake and consumer is not None:
                await self._take_assignment(sorted(consumer.assignment()))
            else:
                # Given up: settled before the next owner reads the positions, which it would otherwise
                # wait for until the coordinator times the transaction out.
                async with asyncio.timeout(FENCE_TIMEOUT_S):
                    await self._fence(self._transactional_id)
            return
        self._positions = positions
        self._tagged = True
        self._handover.committed(
            (TopicPartition(written[i].topic, written[i].partition), written[i].offset) for i in requests
        )
        # Only now, with the transaction committed, do its changes reach the stores, each batch with
        # the changelog position it brings the store to.
        now_ms = int(self.clock().timestamp() * 1000)
        for partition, store in self._stores.items():
            last = last_changelog_write.get(partition)
            store.commit(Checkpoint(written[last].offset + 1, now_ms) if last is not None else None)
        for partition, context in contexts.items():
            self._stream_time[partition] = max(self._stream_time.get(partition, 0), context.stream_time_ms)
        self.stats.transactions += 1
        self._committed(contexts.values(), time.monotonic() - began)

    async def _send_commit(
        self, producer: Transactions, records: list[Outgoing], tagged: dict[TopicPartition, tuple[int, str]]
    ) -> list[Written]:
        self._cadence.began(time.monotonic())
        try:
            return await producer.commit(records, tagged, self.group_id)
        finally:
            self._cadence.ended(time.monotonic())

    def _committed(self, contexts: Iterable[TaskContext], commit_seconds: float) -> None:
        """What follows a successful commit only: its counts, and each batch's `after_commit` callbacks."""
        contexts = list(contexts)
        self.metrics.committed(contexts, commit_seconds)
        for context in contexts:
            for callback in context.tally.callbacks:
                callback()

    def _rollback(self) -> None:
        for store in self._stores.values():
            store.rollback()
        self._handover.rolled_back()

    # --- assignment lifecycle -----------------------------------------------------------------

    async def _take_assignment(self, assigned: Sequence[TopicPartition]) -> None:
        """Fence every earlier owner of `assigned`, then restore its state and committed positions (also
        when this instance owns and has read them already: after a failed commit).

        A partition's committed offset carries the transactional id of the producer that committed
        it. Starting a producer with that id bumps its epoch: the earlier owner's open transaction is
        aborted and its later commits fail, so nothing a stalled instance does can land after this.
        Only then are the positions and the changelog read, so both are exactly what was committed.
        """
        await self._release_assignment()
        previous = self._transactional_id
        self._assignments += 1
        self._transactional_id = f"{self.group_id}-{self._incarnation}-{self._assignments}"
        self._producer = self._make_transactions(self.settings, self._transactional_id)
        started = time.monotonic()
        async with asyncio.timeout(FENCE_TIMEOUT_S):
            await self._producer.start()
            producer_started = time.monotonic()
            committed = await self._fence_previous_owners(list(assigned), {previous} - {""})
        fenced = time.monotonic()
        self._stores = await self._restore(sorted({tp.partition for tp in assigned}))
        log.info(
            "took assignment",
            extra={
                "service": self.app.name,
                "transaction_client": self.settings.transaction_client,
                "producer_s": round(producer_started - started, 3),
                "fence_s": round(fenced - producer_started, 3),
                "restore_s": round(time.monotonic() - fenced, 3),
            },
        )
        consumer = self._consumer
        assert consumer is not None
        self._positions = {}
        self._tagged = False
        # Every partition is positioned, read before or not: what the consumer fetched meanwhile is
        # dropped (see `_unread`) and read again from here.
        for tp in assigned:
            position = committed.get(tp)
            if position is not None:
                consumer.seek(tp, position)
                self._positions[tp] = position
        # Where the group's first reader starts.
        await consumer.seek_to_beginning([tp for tp in assigned if tp not in self._positions])
        # Read after the fence, so the ends include every request an earlier owner committed.
        handover = [tp for tp in assigned if tp.topic in self._in_process]
        self._handover.reset(await consumer.end_offsets(handover) if handover else {}, self._positions)

    async def _fence_previous_owners(self, assigned: list[TopicPartition], own: set[str]) -> dict[TopicPartition, int]:
        """The committed positions of `assigned`, read once every producer that may still write them is
        fenced: the owners their tags name, and this instance's own earlier producer (`own`).

        The own one is fenced whatever the tags say: its last commit may be taken but not yet written
        out, and it may have failed on an answer that was lost. The positions are read once no commit of
        them is still being written out; while one is, the tags are read again, since its producer is the
        one they will name.
        """
        fenced: set[str] = set()
        admin = make_admin(self.settings)
        await admin.start()
        try:
            while True:
                found = await admin.list_consumer_group_offsets(self.group_id, partitions=assigned)
                # librdkafka sends an offset's metadata with its C string's terminating NUL.
                owners = {meta.metadata.rstrip("\0") for meta in found.values() if meta.offset >= 0 and meta.metadata}
                unfenced = (owners | own) - fenced - {self._transactional_id}
                if unfenced:
                    await asyncio.gather(*(self._fence(owner) for owner in unfenced))
                    fenced |= unfenced
                    continue
                try:
                    await offsets_settled(self.settings, self.group_id, assigned, timeout_s=SETTLED_WAIT_S)
                except KafkaException:
                    continue  # still being written out
                settled = await admin.list_consumer_group_offsets(self.group_id, partitions=assigned)
                if settled == found:
                    return {tp: meta.offset for tp, meta in found.items() if meta.offset >= 0}
        finally:
            await admin.close()

    async def _fence(self, transactional_id: str) -> None:
        await fence(self.settings, transactional_id)
        self.metrics.fenced_owners.labels(self.app.name).inc()
        log.info("fenced an earlier owner", extra={"service": self.app.name, "transactional_id": transactional_id})

    async def _restore(self, partitions: Sequence[int]) -> dict[int, KeyedStore]:
        """Each task's store, brought up to the changelog's end: from its checkpoint when the local
        store has a usable one, else in full into an emptied store."""
        changelog = self.settings.topic(self.app.changelog)
        started = time.monotonic()
        stores = {partition: self._store_factory.open(partition) for partition in partitions}
        tps = {partition: TopicPartition(changelog, partition) for partition in partitions}
        if not tps:
            return stores
        reader = make_consumer(self.settings, group_id=None, enable_auto_commit=False)
        await reader.start()
        count = 0
        try:
            reader.assign(list(tps.values()))
            ends = await reader.end_offsets(list(tps.values()))
            beginnings = await reader.beginning_offsets(list(tps.values()))
            delete_retention_ms = await self._delete_retention_ms(changelog)
            now_ms = int(self.clock().timestamp() * 1000)
            for partition, tp in tps.items():
                start, why = restore_start(
                    stores[partition].backend.checkpoint(),
                    beginning=beginnings[tp],
                    end=ends[tp],
                    now_ms=now_ms,
                    delete_retention_ms=delete_retention_ms,
                )
                if start is None:
                    stores[partition] = self._store_factory.reset(partition, stores[partition])
                    self.stats.full_restores += 1
                    log.info(
                        "restoring task state in full",
                        extra={"service": self.app.name, "partition": partition, "why": why},
                    )
                    reader.seek(tp, beginnings[tp])
                else:
                    reader.seek(tp, start)
            pending = {tp for tp in tps.values() if await reader.position(tp) < ends[tp]}
            while pending:
                batch = await reader.getmany(*pending, timeout_ms=500)
                for tp, records in batch.items():
                    if records:
                        stores[tp.partition].restore_batch(
                            (_changelog_record(record) for record in records),
                            Checkpoint(records[-1].offset + 1, now_ms),
                        )
                    count += len(records)
                pending = {tp for tp in pending if await reader.position(tp) < ends[tp]}
            # Every store now matches its changelog up to the end, read or not: say so, so the next
            # restore of a task that wrote nothing is incremental too.
            for partition, tp in tps.items():
                stores[partition].restore_batch([], Checkpoint(ends[tp], now_ms))
        except BaseException:
            for partition, store in stores.items():
                self._store_factory.close(partition, store)
            raise
        finally:
            await reader.stop()
        elapsed = time.monotonic() - started
        self.stats.restored_records = count
        self.stats.restore_seconds = elapsed
        log.info(
            "restored task state",
            extra={
                "service": self.app.name,
                "partitions": list(partitions),
                "records": count,
                "seconds": round(elapsed, 3),
            },
        )
        return stores

    async def _delete_retention_ms(self, changelog: str) -> int:
        """The changelog's delete.retention.ms as the broker has it: how old a checkpoint may be."""
        admin = make_admin(self.settings)
        await admin.start()
        try:
            found = await topic_config(admin, changelog, "delete.retention.ms")
        finally:
            await admin.close()
        return int(found) if found is not None else DEFAULT_DELETE_RETENTION_MS

    async def _release_assignment(self) -> None:
        self._pending, self._pending_offsets, self._pending_records = {}, {}, 0
        stores, self._stores = self._stores, {}
        for partition, store in stores.items():
            self._store_factory.close(partition, store)
        self._positions = {}
        self._handover.reset({}, {})
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


class _Handover:
    """When a request may skip its topic: the bookkeeping behind `TransactionalRunner._hand_over`.

    All of an order's requests come from the order's own task, and a task has one owner at a time,
    so a request handed over can only overtake one sent earlier through the same partition and not
    yet read. A partition takes hand-overs only when none is left: not the records on it when the
    assignment began (`backlogged`, until the consumer's position passes them), not those this
    instance wrote since (until read back), and none in the open transaction.
    """

    def __init__(self) -> None:
        self.reset({}, {})

    def reset(self, ends: dict[TopicPartition, int], positions: dict[TopicPartition, int]) -> None:
        self._ends = dict(ends)
        self.backlogged = {tp for tp, end in ends.items() if positions.get(tp, -1) < end}
        self._read: dict[TopicPartition, int] = {}
        self._written: dict[TopicPartition, int] = {}
        self._sending: set[TopicPartition] = set()

    def caught_up(self, tp: TopicPartition) -> bool:
        return (
            tp in self._ends
            and tp not in self.backlogged
            and tp not in self._sending
            and self._read.get(tp, 0) >= self._written.get(tp, 0)
        )

    def sending(self, tp: TopicPartition) -> None:
        self._sending.add(tp)

    def read(self, tp: TopicPartition, offset: int) -> None:
        self._read[tp] = offset + 1

    def positioned(self, tp: TopicPartition, position: int) -> None:
        if position >= self._ends.get(tp, 0):
            self.backlogged.discard(tp)

    def committed(self, written: Iterable[tuple[TopicPartition, int]]) -> None:
        for tp, offset in written:
            self._written[tp] = max(self._written.get(tp, 0), offset + 1)
        self._sending.clear()

    def rolled_back(self) -> None:
        self._sending.clear()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: TransactionalRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Waiting for the lock lets an in-flight batch commit before its partitions are handed over;
        # what was handled since is committed now, so the next owner need not redo it.
        async with self.runner._work_lock:
            try:
                if self.runner._producer is not None:
                    self.runner.metrics.revocations.labels(self.runner.app.name).inc()
                    await self.runner._flush(retake=False)
            finally:
                await self.runner._release_assignment()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        async with self.runner._work_lock:
            if self.runner._stopping.is_set():
                return
            try:
                await self.runner._take_assignment(assigned)
            except Exception as error:
                # aiokafka would only log a listener's error and leave us owning partitions we never
                # process: stop instead, so the process exits and the group moves them on.
                self.runner._fail(error)
                return
        self.runner._assigned.set()
        self.runner.metrics.assignments.labels(self.runner.app.name).inc()
        log.info(
            "partitions assigned",
            extra={
                "service": self.runner.app.name,
                "partitions": self.runner.partitions,
                "transactional_id": self.runner.transactional_id,
            },
        )

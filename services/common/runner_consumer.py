"""The runner's input consumer, on either client library: batches of records and the group's assignments.

- `aiokafka` runs the fetches and the group protocol on the event loop, in Python.
- `confluent` (librdkafka) fetches and parses on its own threads, in C. Its calls that wait (a batch,
  closing) run in one worker thread; its assignment callbacks, which librdkafka serves from inside that
  wait, hand the runner's listener over to the event loop and block the worker until it is done.

Either way the group's offsets are only ever committed in the runner's transactions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from confluent_kafka import OFFSET_BEGINNING, OFFSET_STORED, Consumer, KafkaException
from confluent_kafka import KafkaError as ConfluentError
from confluent_kafka import TopicPartition as ConfluentPartition

from services.common.held_fetches import Deadline, hold_fetches
from services.common.kafka import confluent_options
from services.common.kafka import consumer as make_aiokafka_consumer
from services.common.metrics import fetched_lag
from services.common.settings import ChoreoSettings

log = logging.getLogger(__name__)
# aiokafka's defaults, so that a member that died is replaced as soon on either client.
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_INTERVAL_MS = 3_000
PREFETCH_KIB = 8192
# How soon a partition whose fetched records are still unread is looked at again (librdkafka's default: 1 s).
FETCH_QUEUE_BACKOFF_MS = 5
# How long a call that asks the broker (watermarks) may wait.
CALL_TIMEOUT_S = 15.0


class Row(NamedTuple):
    """One record as the runner reads it (aiokafka's `ConsumerRecord` has the same fields)."""

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: Sequence[tuple[str, bytes]] | None


class RunnerConsumer(Protocol):
    async def start(self, topics: Sequence[str], listener: ConsumerRebalanceListener) -> None:
        """Join the group; `listener` hears of every assignment and revocation."""

    async def stop(self) -> None: ...

    async def getmany(self, timeout_ms: int) -> dict[TopicPartition, list[Any]]:
        """What has arrived, by partition, waiting at most `timeout_ms` for anything to."""
        ...

    async def between_assignments(self, wait_s: float) -> dict[TopicPartition, list[Any]]:
        """Let the group protocol run for `wait_s` while nothing is assigned; what it returns is to be
        processed as a batch (records of an assignment made meanwhile)."""
        ...

    async def position(self, tp: TopicPartition) -> int: ...

    def seek(self, tp: TopicPartition, offset: int) -> None: ...

    async def seek_to_beginning(self, tps: Sequence[TopicPartition]) -> None:
        """Read each of `tps` (again) from its oldest record."""

    def assignment(self) -> set[TopicPartition]: ...

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]: ...

    def fetched_lag(self) -> Iterator[tuple[TopicPartition, int]]:
        """(partition, records behind) of each assigned partition, as last fetched."""
        ...

    def hold_fetches(self, deadline: Deadline, *, mostly_skipped: Collection[str], skipped_every_s: float) -> None:
        """Have the broker hold each fetch until just before `deadline()`, when that names a time, and fetch the
        topics `mostly_skipped` once per `skipped_every_s` otherwise (`services.common.held_fetches`); a client
        that cannot change a fetch's wait ignores it."""


class AiokafkaRunnerConsumer:
    def __init__(self, settings: ChoreoSettings, group_id: str, max_batch: int) -> None:
        self._consumer = make_aiokafka_consumer(
            settings,
            group_id=group_id,
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_records=max_batch,
            # A saga is a chain of hops; a short fetch wait keeps each hop's latency low.
            fetch_max_wait_ms=int(settings.fetch_max_wait.total_seconds() * 1000),
            fetch_min_bytes=settings.fetch_min_bytes,
        )

    async def start(self, topics: Sequence[str], listener: ConsumerRebalanceListener) -> None:
        self._consumer.subscribe(list(topics), listener=listener)
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def getmany(self, timeout_ms: int) -> dict[TopicPartition, list[Any]]:
        batch: dict[TopicPartition, list[Any]] = await self._consumer.getmany(timeout_ms=timeout_ms)
        return batch

    async def between_assignments(self, wait_s: float) -> dict[TopicPartition, list[Any]]:
        # The group protocol runs in aiokafka's own tasks: yield to them (getmany with a zero
        # timeout would not).
        await asyncio.sleep(wait_s)
        return {}

    async def position(self, tp: TopicPartition) -> int:
        position: int = await self._consumer.position(tp)
        return position

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(tp, offset)

    async def seek_to_beginning(self, tps: Sequence[TopicPartition]) -> None:
        if tps:  # aiokafka reads no partitions as every assigned one
            await self._consumer.seek_to_beginning(*tps)

    def assignment(self) -> set[TopicPartition]:
        return set(self._consumer.assignment())

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets(list(tps))
        return ends

    def fetched_lag(self) -> Iterator[tuple[TopicPartition, int]]:
        return fetched_lag(self._consumer)

    def hold_fetches(self, deadline: Deadline, *, mostly_skipped: Collection[str], skipped_every_s: float) -> None:
        hold_fetches(self._consumer._fetcher, deadline, mostly_skipped=mostly_skipped, skipped_every_s=skipped_every_s)


class ConfluentRunnerConsumer:
    def __init__(self, settings: ChoreoSettings, group_id: str, max_batch: int) -> None:
        self._options = {
            **confluent_options(settings),
            "group.id": group_id,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "range",
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
            "fetch.wait.max.ms": int(settings.fetch_max_wait.total_seconds() * 1000),
            "fetch.min.bytes": settings.fetch_min_bytes,
            # What librdkafka fetches ahead of the runner, bounded well below its default of 64 MiB.
            "queued.max.messages.kbytes": PREFETCH_KIB,
            # A partition is fetched again once what was fetched is read, as aiokafka does: prefetching on
            # (librdkafka's default keeps up to 100,000 records a partition) sends the broker a fetch for
            # every few records under load; at 400 sagas/s it cost the broker 0.2-0.4 ms more a saga.
            "queued.min.messages": 1,
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
        }
        self._max_batch = max_batch
        self._consumer: Consumer | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="consumer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: ConsumerRebalanceListener | None = None
        self._assigned: set[TopicPartition] = set()
        self._assigning: dict[TopicPartition, int] | None = None
        """While the listener takes an assignment: the offsets it seeks, applied when it is done."""
        self._starts: dict[TopicPartition, int] = {}
        self._ends_reader: Consumer | None = None
        """Never joins the group: it only asks for partitions' end offsets."""
        self._generation = 0
        """Assignments and revocations so far: what tells records of one assignment from the next."""

    async def start(self, topics: Sequence[str], listener: ConsumerRebalanceListener) -> None:
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        self._consumer = Consumer(self._options)
        self._consumer.subscribe(
            list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            # Closing leaves the group, and librdkafka serves the revocation from inside it.
            await asyncio.get_running_loop().run_in_executor(self._worker, consumer.close)
        self._worker.shutdown(wait=False)
        reader, self._ends_reader = self._ends_reader, None
        if reader is not None:
            await asyncio.to_thread(reader.close)

    def _client(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("the consumer is not started")
        return self._consumer

    async def getmany(self, timeout_ms: int) -> dict[TopicPartition, list[Any]]:
        messages = await asyncio.get_running_loop().run_in_executor(
            self._worker, self._consume, max(0, timeout_ms) / 1000
        )
        batch: dict[TopicPartition, list[Any]] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                if error.code() != ConfluentError._PARTITION_EOF:
                    log.warning("consumer error", extra={"error": str(error)})
                continue
            tp = TopicPartition(message.topic(), message.partition())
            row = Row(message.offset(), message.key(), message.value(), message.timestamp()[1], message.headers())
            rows = batch.get(tp)
            if rows is None:
                batch[tp] = [row]
            else:
                rows.append(row)
        return batch

    def _consume(self, timeout_s: float) -> list[Any]:
        """Whatever is there as soon as anything is, as aiokafka's getmany (`consume(n, timeout)` would wait
        for a whole batch or its whole timeout).

        One poll at a time, because librdkafka serves an assignment's callbacks from inside a poll: what
        earlier polls returned then belongs to the assignment before it, whose uncommitted records the
        new one reads again from the committed offsets, so it is dropped. A record the same poll returns
        after the callback is the new assignment's (librdkafka discards fetches of an older one).
        """
        consumer = self._client()
        messages: list[Any] = []
        generation = self._generation
        message = consumer.poll(timeout_s)
        while message is not None:
            if self._generation != generation:
                messages, generation = [], self._generation
            messages.append(message)
            if len(messages) >= self._max_batch:
                break
            message = consumer.poll(0)
        return messages if self._generation == generation else []

    async def between_assignments(self, wait_s: float) -> dict[TopicPartition, list[Any]]:
        # librdkafka serves assignments only from inside a poll.
        return await self.getmany(int(wait_s * 1000))

    def _on_assign(self, consumer: Consumer, partitions: list[ConfluentPartition]) -> None:
        tps = [TopicPartition(p.topic, p.partition) for p in partitions]
        self._generation += 1
        self._assigning = {}
        try:
            self._run_listener(self._listener_of().on_partitions_assigned(tps))
            seeks = self._assigning
        finally:
            self._assigning = None
        consumer.assign([ConfluentPartition(tp.topic, tp.partition, seeks.get(tp, OFFSET_STORED)) for tp in tps])
        self._assigned = set(tps)
        self._starts = {tp: offset for tp, offset in seeks.items() if offset >= 0}

    def _on_revoke(self, consumer: Consumer, partitions: list[ConfluentPartition]) -> None:
        tps = [TopicPartition(p.topic, p.partition) for p in partitions]
        self._generation += 1
        try:
            self._run_listener(self._listener_of().on_partitions_revoked(tps))
        finally:
            self._assigned = set()
            self._starts = {}
            consumer.unassign()

    def _listener_of(self) -> ConsumerRebalanceListener:
        if self._listener is None:
            raise RuntimeError("the consumer is not started")
        return self._listener

    def _run_listener(self, step: Any) -> None:
        """Run the listener's coroutine on the event loop, from the worker thread, until it is done."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(step, self._loop).result()

    async def position(self, tp: TopicPartition) -> int:
        found = self._client().position([ConfluentPartition(tp.topic, tp.partition)])[0].offset
        if found >= 0:
            return int(found)
        return self._starts.get(tp, 0)  # nothing read yet

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if self._assigning is not None:
            self._assigning[tp] = offset  # not assigned yet: where it will start
            return
        self._client().seek(ConfluentPartition(tp.topic, tp.partition, offset))
        self._starts[tp] = offset

    async def seek_to_beginning(self, tps: Sequence[TopicPartition]) -> None:
        if self._assigning is not None:
            self._assigning.update(dict.fromkeys(tps, OFFSET_BEGINNING))
            return
        for tp in tps:
            self._client().seek(ConfluentPartition(tp.topic, tp.partition, OFFSET_BEGINNING))
            self._starts.pop(tp, None)

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        # Not the group's consumer: asked while it serves an assignment, librdkafka never answers.
        if self._ends_reader is None:
            self._ends_reader = Consumer({**self._options, "group.id": f"{self._options['group.id']}-ends"})
        consumer = self._ends_reader

        def ends() -> dict[TopicPartition, int]:
            return {tp: _end_offset(consumer, tp) for tp in tps}

        return await asyncio.to_thread(ends)

    def fetched_lag(self) -> Iterator[tuple[TopicPartition, int]]:
        consumer = self._consumer
        if consumer is None:
            return
        for tp in list(self._assigned):
            partition = ConfluentPartition(tp.topic, tp.partition)
            _low, high = consumer.get_watermark_offsets(partition, cached=True)
            position = consumer.position([partition])[0].offset
            if high >= 0 and position >= 0:
                yield tp, max(0, high - position)

    def hold_fetches(self, deadline: Deadline, *, mostly_skipped: Collection[str], skipped_every_s: float) -> None:
        """librdkafka sets a fetch's wait once, for the consumer's life: its fetches are not held."""


# Answers a partition's leader gives while it moves (a new topic, a broker restarting): asked again.
_LEADER_MOVING = frozenset(
    {
        ConfluentError.NOT_LEADER_FOR_PARTITION,
        ConfluentError.LEADER_NOT_AVAILABLE,
        ConfluentError.UNKNOWN_TOPIC_OR_PART,
    }
)
END_OFFSET_RETRY_S = 0.1


def _end_offset(consumer: Consumer, tp: TopicPartition) -> int:
    """The partition's end offset, asked again while its leader moves, for at most `CALL_TIMEOUT_S`."""
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while True:
        try:
            _low, high = consumer.get_watermark_offsets(ConfluentPartition(tp.topic, tp.partition), CALL_TIMEOUT_S)
            return int(high)
        except KafkaException as exception:
            error = exception.args[0] if exception.args else None
            moving = isinstance(error, ConfluentError) and (error.retriable() or error.code() in _LEADER_MOVING)
            if not moving or time.monotonic() >= deadline:
                raise
            time.sleep(END_OFFSET_RETRY_S)  # in a worker thread, never on the event loop


def runner_consumer(settings: ChoreoSettings, group_id: str, max_batch: int) -> RunnerConsumer:
    """The runner's consumer on the client `CHOREO_CONSUMER_CLIENT` names."""
    if settings.consumer_client == "confluent":
        return ConfluentRunnerConsumer(settings, group_id, max_batch)
    return AiokafkaRunnerConsumer(settings, group_id, max_batch)

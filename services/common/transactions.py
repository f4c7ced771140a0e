"""One Kafka transaction of the runner, on either client library: records, tagged offsets, commit.

The runner hands over everything one transaction carries and gets each record's offset back, or one
of two errors: `FencedError` (a newer owner took over; the instance must stop) or `TransactionFailedError`
(nothing of it landed; redo it from the last commit with a new producer).

- `aiokafka` encodes every request in Python and speaks v0 of the transaction calls.
- `confluent` (librdkafka) does the protocol in C on its own threads; only its blocking calls
  (initialising, offsets, commit) wait in a worker thread. Its group metadata comes from a consumer
  that never joins the group, so the offsets are committed for the group as aiokafka does (no
  generation check, KIP-447); fencing stays the runner's, through the tag on each committed offset.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced
from aiokafka.producer.message_accumulator import BatchBuilder
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka import KafkaError as ConfluentError
from confluent_kafka import TopicPartition as ConfluentPartition

from services.common.kafka import confluent_options, default_partitioner
from services.common.kafka import producer as make_aiokafka_producer
from services.common.settings import ChoreoSettings

TransactionClient = Literal["aiokafka", "confluent"]
# The broker answers CONCURRENT_TRANSACTIONS while it still writes the previous commit's markers;
# retrying after the default 100 ms would add that much to every hop.
RETRY_BACKOFF_MS = 20
# A whole batch's records for one partition fit one producer batch: with the default 16 KiB a
# busy task's sends waited for earlier batches to drain, one produce round trip at a time.
BATCH_BYTES = 512 * 1024
LINGER_MS = 2
# librdkafka's blocking calls wait at most this long; a broker that never answers fails the transaction.
CALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Outgoing:
    """A record to write in a transaction; without a partition, its key's (murmur2) picks one."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Written:
    """Where a committed record landed."""

    topic: str
    partition: int
    offset: int


class FencedError(RuntimeError):
    """A newer producer took this transactional id over: this instance no longer owns its tasks."""


class TransactionFailedError(RuntimeError):
    """The transaction was aborted; nothing of it is visible."""


class Transactions(Protocol):
    transactional_id: str

    async def start(self) -> None:
        """Register the id with its coordinator: earlier producers of the id are fenced, their open
        transaction aborted."""

    async def stop(self) -> None: ...

    async def commit(
        self, records: Sequence[Outgoing], offsets: Mapping[TopicPartition, tuple[int, str]], group_id: str
    ) -> list[Written]:
        """Write `records` and commit `offsets` (offset, metadata) for `group_id`, all or nothing."""
        ...


class AiokafkaTransactions:
    def __init__(self, settings: ChoreoSettings, transactional_id: str) -> None:
        self.transactional_id = transactional_id
        self._producer = make_aiokafka_producer(
            settings,
            transactional_id=transactional_id,
            linger_ms=LINGER_MS,
            retry_backoff_ms=RETRY_BACKOFF_MS,
            max_batch_size=BATCH_BYTES,
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def commit(
        self, records: Sequence[Outgoing], offsets: Mapping[TopicPartition, tuple[int, str]], group_id: str
    ) -> list[Written]:
        producer = self._producer
        deliveries: list[asyncio.Future[Any]] = []
        try:
            async with producer.transaction():
                # Whole producer batches, filled in C: `send` costs a coroutine, three metadata lookups
                # and a future for every record, more than the record's own encoding.
                batches, placements = await self._batches(records)
                for tp, batch in batches:
                    deliveries.append(await producer.send_batch(batch, tp.topic, partition=tp.partition))
                # Every batch's outcome is read here, so a failed send fails this transaction
                # (and is never left as an unobserved error). The offsets are added only once the
                # records are written: a produce the broker verifies while the coordinator adds the
                # offsets (AddOffsetsToTxn) is answered NOT_ENOUGH_REPLICAS, retried after a backoff
                # and logged as a warning; one after the other is also the faster of the two.
                sent = [await delivery for delivery in deliveries]  # gather would wrap each in a task
                if offsets:
                    await producer.send_offsets_to_transaction(dict(offsets), group_id)
        except ProducerFenced as error:
            _observe(deliveries)
            raise FencedError(str(error)) from error
        except KafkaError as error:
            _observe(deliveries)
            raise TransactionFailedError(repr(error)) from error
        # A record's offset is its batch's base offset plus its place in the batch.
        return [Written(sent[n].topic, sent[n].partition, sent[n].offset + place) for n, place in placements]

    async def _batches(
        self, records: Sequence[Outgoing]
    ) -> tuple[list[tuple[TopicPartition, BatchBuilder]], list[tuple[int, int]]]:
        """`records` as producer batches, and where each record went: (which batch, its place in it).

        A partition's records keep their order, each batch a run of them; a record without a partition
        goes where the producer's partitioner would send it.
        """
        producer = self._producer
        partitions: dict[str, list[int]] = {}
        open_batch: dict[TopicPartition, int] = {}
        batches: list[tuple[TopicPartition, BatchBuilder]] = []
        placements: list[tuple[int, int]] = []
        for record in records:
            partition = record.partition
            if partition is None:
                known = partitions.get(record.topic)
                if known is None:
                    known = partitions[record.topic] = sorted(await producer.partitions_for(record.topic))
                partition = default_partitioner(record.key, known, known)
            tp = TopicPartition(record.topic, partition)
            number = open_batch.get(tp)
            # A fresh batch takes any first record; one the current batch refuses starts the next.
            while number is None or not _appended(batches[number][1], record):
                number = open_batch[tp] = len(batches)
                batches.append((tp, producer.create_batch()))
            placements.append((number, batches[number][1].record_count() - 1))
        for _, batch in batches:
            batch.close()  # nothing else may add to it once submitted
        return batches, placements


def _appended(batch: BatchBuilder, record: Outgoing) -> bool:
    return batch.append(timestamp=None, key=record.key, value=record.value, headers=list(record.headers)) is not None


def _observe(deliveries: list[asyncio.Future[Any]]) -> None:
    """The sends of a failed transaction fail with it: read their errors, which that failure reports."""
    for delivery in deliveries:
        delivery.add_done_callback(lambda done: done.cancelled() or done.exception())


class ConfluentTransactions:
    def __init__(self, settings: ChoreoSettings, transactional_id: str) -> None:
        self.transactional_id = transactional_id
        self._settings = settings
        self._producer = Producer(
            {
                **confluent_options(settings),
                "transactional.id": transactional_id,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": LINGER_MS,
                "retry.backoff.ms": RETRY_BACKOFF_MS,
                "batch.size": BATCH_BYTES,
                # Java's and aiokafka's partitioner: a keyed record lands where theirs would.
                "partitioner": "murmur2_random",
            }
        )
        self._metadata_sources: dict[str, Consumer] = {}

    async def start(self) -> None:
        await asyncio.to_thread(self._producer.init_transactions, CALL_TIMEOUT_S)

    async def stop(self) -> None:
        await asyncio.to_thread(self._producer.flush, CALL_TIMEOUT_S)
        for consumer in self._metadata_sources.values():
            await asyncio.to_thread(consumer.close)
        self._metadata_sources.clear()

    def _group_metadata(self, group_id: str) -> Any:
        source = self._metadata_sources.get(group_id)
        if source is None:
            # Never subscribes: its metadata names the group with no member or generation.
            source = Consumer(
                {
                    **confluent_options(self._settings),
                    "group.id": group_id,
                    "enable.auto.commit": False,
                }
            )
            self._metadata_sources[group_id] = source
        return source.consumer_group_metadata()

    async def commit(
        self, records: Sequence[Outgoing], offsets: Mapping[TopicPartition, tuple[int, str]], group_id: str
    ) -> list[Written]:
        producer = self._producer
        written: list[Written | None] = [None] * len(records)
        failures: list[str] = []
        try:
            producer.begin_transaction()
            for index, record in enumerate(records):
                self._produce(record, functools.partial(_delivered, written, failures, index))
            if offsets:
                positions = [
                    ConfluentPartition(tp.topic, tp.partition, offset, metadata)
                    for tp, (offset, metadata) in offsets.items()
                ]
                await asyncio.to_thread(
                    producer.send_offsets_to_transaction, positions, self._group_metadata(group_id), CALL_TIMEOUT_S
                )
            await asyncio.to_thread(producer.commit_transaction, CALL_TIMEOUT_S)
        except KafkaException as exception:
            raise await self._failed(exception) from exception
        # The commit means every record was delivered; their reports may still wait to be served. The
        # transaction has landed, so a missing report is never a reason to redo it.
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while any(found is None for found in written) and not failures and time.monotonic() < deadline:
            producer.poll(0.01)
        if failures or any(found is None for found in written):
            raise RuntimeError(f"a committed transaction's delivery reports are missing or failed: {failures[:3]}")
        return [found for found in written if found is not None]

    def _produce(self, record: Outgoing, on_delivery: Any) -> None:
        options: dict[str, Any] = {"headers": list(record.headers)} if record.headers else {}
        if record.partition is not None:
            options["partition"] = record.partition
        while True:
            try:
                self._producer.produce(record.topic, record.value, record.key, on_delivery=on_delivery, **options)
                return
            except BufferError:
                self._producer.poll(0.05)  # the local queue is full: let deliveries drain it

    async def _failed(self, exception: KafkaException) -> Exception:
        """What a failed call means; an abortable transaction is aborted on the way.

        A fatal error is taken for a fence whatever its code: restarting a producer of this id would
        bump its epoch past the fence of a newer owner, and this instance's next commit would land.
        """
        error = exception.args[0] if exception.args else None
        if not isinstance(error, ConfluentError) or error.fatal() or error.code() in FENCING_CODES:
            return FencedError(str(error))
        if error.txn_requires_abort():
            await asyncio.to_thread(self._producer.abort_transaction, CALL_TIMEOUT_S)
        return TransactionFailedError(str(error))


FENCING_CODES = frozenset(
    {ConfluentError._FENCED, ConfluentError.PRODUCER_FENCED, ConfluentError.INVALID_PRODUCER_EPOCH}
)


def _delivered(written: list[Written | None], failures: list[str], index: int, error: Any, message: Any) -> None:
    if error is not None:
        failures.append(str(error))
    else:
        written[index] = Written(message.topic(), message.partition(), message.offset())


def transactions(settings: ChoreoSettings, transactional_id: str) -> Transactions:
    """A producer of `transactional_id` on the client `CHOREO_TRANSACTION_CLIENT` names."""
    if settings.transaction_client == "confluent":
        return ConfluentTransactions(settings, transactional_id)
    return AiokafkaTransactions(settings, transactional_id)


async def fence(settings: ChoreoSettings, transactional_id: str) -> None:
    """Fence every earlier producer of `transactional_id`: starting one is the fence."""
    producer = transactions(settings, transactional_id)
    await producer.start()
    await producer.stop()

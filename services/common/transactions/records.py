"""What a transaction carries and gives back, its two errors, and what every client shares."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiokafka import TopicPartition
from aiokafka.producer.message_accumulator import BatchBuilder

from services.common.kafka import default_partitioner

# The broker answers CONCURRENT_TRANSACTIONS while it still writes the previous commit's markers;
# retrying after the default 100 ms would add that much to every hop.
RETRY_BACKOFF_MS = 20
# A whole batch's records for one partition fit one producer batch: with the default 16 KiB a
# busy task's sends waited for earlier batches to drain, one produce round trip at a time.
BATCH_BYTES = 512 * 1024
LINGER_MS = 2
# A blocking call or a request waits at most this long; a broker that never answers fails the transaction.
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


Batches = list[tuple[TopicPartition, BatchBuilder]]


async def batched(
    records: Sequence[Outgoing],
    partitions_of: Callable[[str], Awaitable[list[int]]],
    new_batch: Callable[[], BatchBuilder],
) -> tuple[Batches, list[tuple[int, int]]]:
    """`records` as producer batches, filled in C, and where each record went: (which batch, its place).

    A partition's records keep their order, each batch a run of them; a record without a partition
    goes where the producer's partitioner would send it.
    """
    partitions: dict[str, list[int]] = {}
    open_batch: dict[TopicPartition, int] = {}
    batches: Batches = []
    placements: list[tuple[int, int]] = []
    for record in records:
        partition = record.partition
        if partition is None:
            known = partitions.get(record.topic)
            if known is None:
                known = partitions[record.topic] = await partitions_of(record.topic)
            partition = default_partitioner(record.key, known, known)
        tp = TopicPartition(record.topic, partition)
        number = open_batch.get(tp)
        # A fresh batch takes any first record; one the current batch refuses starts the next.
        while number is None or not _appended(batches[number][1], record):
            number = open_batch[tp] = len(batches)
            batches.append((tp, new_batch()))
        placements.append((number, batches[number][1].record_count() - 1))
    for _, batch in batches:
        batch.close()  # nothing else may add to it once submitted
    return batches, placements


def _appended(batch: BatchBuilder, record: Outgoing) -> bool:
    return batch.append(timestamp=None, key=record.key, value=record.value, headers=list(record.headers)) is not None

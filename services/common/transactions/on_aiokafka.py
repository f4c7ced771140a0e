"""The runner's transactions on aiokafka's producer: every request encoded in Python, v0 of the transaction
calls (AddPartitionsToTxn, Produce, AddOffsetsToTxn, TxnOffsetCommit, EndTxn, one after the other)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from services.common.kafka import producer as make_aiokafka_producer
from services.common.settings import ChoreoSettings
from services.common.transactions.records import (
    BATCH_BYTES,
    LINGER_MS,
    RETRY_BACKOFF_MS,
    FencedError,
    Outgoing,
    TransactionFailedError,
    Written,
    batched,
)


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
                batches, placements = await batched(records, self._partitions_of, producer.create_batch)
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

    async def _partitions_of(self, topic: str) -> list[int]:
        return sorted(await self._producer.partitions_for(topic))


def _observe(deliveries: list[asyncio.Future[Any]]) -> None:
    """The sends of a failed transaction fail with it: read their errors, which that failure reports."""
    for delivery in deliveries:
        delivery.add_done_callback(lambda done: done.cancelled() or done.exception())

"""The runner's transactions on confluent-kafka (librdkafka): the protocol in C on its own threads; only its
blocking calls (initialising, offsets, commit) wait in a worker thread. Its group metadata comes from a
consumer that never joins the group, so the offsets are committed for the group as aiokafka does (no
generation check, KIP-447); fencing stays the runner's, through the tag on each committed offset."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import TopicPartition
from confluent_kafka import Consumer, KafkaException
from confluent_kafka import KafkaError as ConfluentError
from confluent_kafka import TopicPartition as ConfluentPartition

from services.common.kafka import confluent_options, confluent_producer
from services.common.settings import ChoreoSettings
from services.common.transactions.records import (
    BATCH_BYTES,
    CALL_TIMEOUT_S,
    LINGER_MS,
    RETRY_BACKOFF_MS,
    FencedError,
    Outgoing,
    TransactionFailedError,
    Written,
)


class ConfluentTransactions:
    def __init__(self, settings: ChoreoSettings, transactional_id: str) -> None:
        self.transactional_id = transactional_id
        self._settings = settings
        self._producer = confluent_producer(
            settings,
            **{
                "transactional.id": transactional_id,
                "linger.ms": LINGER_MS,
                "retry.backoff.ms": RETRY_BACKOFF_MS,
                "batch.size": BATCH_BYTES,
            },
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

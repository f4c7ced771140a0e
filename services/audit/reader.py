"""Reading the audit topic: one order's trail, every order's, or a live feed.

A plain consumer without a group: it assigns the partitions itself and commits nothing, so any
number of readers can run beside the services. read_committed, so only committed events show.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiokafka import TopicPartition

from schemas.envelope import ContractError, Envelope
from schemas.topics import AUDIT
from services.audit.timeline import OrderStatus, event_line, order_status, timeline
from services.common.kafka import batches_until, partition_for
from services.common.kafka import consumer as make_consumer
from services.common.settings import ChoreoSettings
from services.common.topics import describe_topics

log = logging.getLogger(__name__)

__all__ = [
    "AuditTopicMissingError",
    "OrderStatus",
    "by_order",
    "event_line",
    "follow",
    "order_status",
    "read_all",
    "read_order",
    "timeline",
]


class AuditTopicMissingError(RuntimeError):
    """The audit topic does not exist on the broker."""


async def read_order(settings: ChoreoSettings, order_id: str, *, stall_timeout: float = 30.0) -> list[Envelope]:
    """Every audited event of one order, in audit (causal) order; empty if the order is unknown."""
    envelopes = await _read_to_end(settings, order_id, stall_timeout)
    return [envelope for envelope in envelopes if envelope.order_id == order_id]


async def read_all(settings: ChoreoSettings, *, stall_timeout: float = 30.0) -> list[Envelope]:
    """Every audited event; each order's events keep their audit order (orders interleave across partitions)."""
    return await _read_to_end(settings, None, stall_timeout)


def by_order(envelopes: Iterable[Envelope]) -> dict[str, list[Envelope]]:
    """Group by order, oldest order first (by its first event's time), each order in audit order."""
    groups: dict[str, list[Envelope]] = {}
    for envelope in envelopes:
        groups.setdefault(envelope.order_id, []).append(envelope)
    return dict(sorted(groups.items(), key=lambda item: (item[1][0].occurred_at, item[0])))


async def follow(
    settings: ChoreoSettings, *, order_id: str | None = None, from_beginning: bool = False
) -> AsyncIterator[Envelope]:
    """Audited events as they are committed, forever; from now on unless `from_beginning`."""
    partitions = await _partitions(settings, order_id)
    consumer = make_consumer(settings, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        if from_beginning:
            await consumer.seek_to_beginning(*partitions)
        else:
            await consumer.seek_to_end(*partitions)
        while True:
            batch = await consumer.getmany(*partitions, timeout_ms=1000)
            for records in batch.values():
                for envelope in _parse(records):
                    if order_id is None or envelope.order_id == order_id:
                        yield envelope
    finally:
        await consumer.stop()


async def _read_to_end(settings: ChoreoSettings, order_id: str | None, stall_timeout: float) -> list[Envelope]:
    partitions = await _partitions(settings, order_id)
    consumer = make_consumer(settings, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        # Under read_committed these are the last stable offsets: an open transaction cannot make us wait.
        ends = await consumer.end_offsets(partitions)
        found: list[Envelope] = []
        async for batch in batches_until(consumer, ends, settings.topic(AUDIT), stall_timeout):
            for records in batch.values():
                found.extend(_parse(records))
        return found
    finally:
        await consumer.stop()


async def _partitions(settings: ChoreoSettings, order_id: str | None) -> list[TopicPartition]:
    """All partitions of the audit topic, or only the one an order's key hashes to."""
    described = await describe_topics(settings, [AUDIT])
    name = settings.topic(AUDIT)
    if not described or described[0].partitions < 1:
        raise AuditTopicMissingError(
            f"topic {name} does not exist: run `choreo topics create` and start the audit service"
        )
    count = described[0].partitions
    if order_id is not None:
        # The audit is keyed by order id with Kafka's default partitioner, like every saga topic.
        return [TopicPartition(name, partition_for(order_id.encode(), count))]
    return [TopicPartition(name, number) for number in range(count)]


def _parse(records: Iterable[Any]) -> list[Envelope]:
    envelopes = []
    for record in records:
        try:
            envelopes.append(Envelope.from_bytes(record.value))
        except ContractError as error:
            # The audit service only forwards valid events; anything else was written by someone else.
            log.warning(
                "skipped an audit record that is not a valid envelope",
                extra={"partition": record.partition, "offset": record.offset, "reason": error.reason},
            )
    return envelopes

"""The reviewer API's read model: every approval, kept in memory from the whole `approval.state` changelog.

Each API instance tails every partition of the changelog itself (read_committed, no consumer
group), so any instance can answer for any order, whichever instance's stream runner owns it, and
instances can be added without coordination. The view only ever shows committed stream-side
state: it may lag the stream side by a moment, never run ahead of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from schemas.topics import APPROVAL_STATE
from services.approval.domain import ApprovalState, ApprovalStatus
from services.common.kafka import consumer as make_consumer
from services.common.saga import order_key
from services.common.settings import ChoreoSettings

log = logging.getLogger(__name__)

_ORDER_PREFIX = order_key("")


@dataclass(frozen=True)
class Page:
    items: list[ApprovalState]
    total: int


class ApprovalsView:
    """Approval states by order id, plus the decisions this instance has published but not yet seen ruled.

    The stream side rules on decisions; the view only lets the API answer 404/409 at once. A decision
    this instance published is *claimed* until the order's state shows it ruled, so a second
    decision through the same instance gets 409 even before the first one has been processed.
    """

    def __init__(self) -> None:
        self._states: dict[str, ApprovalState] = {}
        self._claims: dict[str, str] = {}
        self._pending: set[str] = set()
        self._caught_up = asyncio.Event()
        self.updated_at: float | None = None
        self.records = 0

    # --- feeding ----------------------------------------------------------------------------

    def apply(self, key: str, value: bytes | None) -> None:
        """One changelog record: an order's latest state, or a tombstone."""
        self.records += 1
        self.updated_at = time.monotonic()
        if not key.startswith(_ORDER_PREFIX):
            return  # the per-task deadline index and any other bookkeeping
        order_id = key.removeprefix(_ORDER_PREFIX)
        if value is None:
            self._states.pop(order_id, None)
            self._claims.pop(order_id, None)
            self._pending.discard(order_id)
            return
        try:
            state = ApprovalState.model_validate_json(value)
        except ValidationError:
            log.warning("unreadable approval state skipped", extra={"order_id": order_id})
            return
        # `handled` (every emitted event, verbatim) is the stream side's deduplication record; the
        # API never needs it, and dropping it keeps the view a fraction of the changelog's size.
        self._states[order_id] = state.model_copy(update={"handled": {}})
        if state.status is ApprovalStatus.PENDING:
            self._pending.add(order_id)
        else:
            self._pending.discard(order_id)
            self._claims.pop(order_id, None)

    def mark_caught_up(self) -> None:
        self._caught_up.set()

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    async def wait_caught_up(self) -> None:
        await self._caught_up.wait()

    # --- reading ----------------------------------------------------------------------------

    def get(self, order_id: str) -> ApprovalState | None:
        return self._states.get(order_id)

    def page(self, status: ApprovalStatus, limit: int, offset: int) -> Page:
        """Approvals in `status`: pending ones by deadline (most urgent first), others most recently closed first."""
        found = [state for state in self._states.values() if public_status(state) is status]
        if status is ApprovalStatus.PENDING:
            found.sort(key=lambda state: (_sortable(state.deadline, missing=math.inf), state.order_id))
        else:
            found.sort(key=lambda state: (_sortable(state.closed_at, missing=-math.inf), state.order_id), reverse=True)
        return Page(items=found[offset : offset + limit], total=len(found))

    def __len__(self) -> int:
        return len(self._states)

    def pending_count(self) -> int:
        """Approvals waiting for a reviewer's decision."""
        return len(self._pending)

    # --- in-flight decisions ----------------------------------------------------------------

    def claim(self, order_id: str, decision_event_id: str) -> str | None:
        """Reserve the order for one decision; the id of the decision already holding it, if any."""
        holder = self._claims.get(order_id)
        if holder is not None:
            return holder
        self._claims[order_id] = decision_event_id
        return None

    def release(self, order_id: str, decision_event_id: str) -> None:
        """Give up a claim whose decision was never published."""
        if self._claims.get(order_id) == decision_event_id:
            del self._claims[order_id]

    def claimed(self, order_id: str) -> str | None:
        return self._claims.get(order_id)


def public_status(state: ApprovalState) -> ApprovalStatus | None:
    """The status a reviewer sees; None while no approval exists for the order.

    An order cancelled before its charge never needs approval, so it reads as cancelled.
    """
    if state.status is ApprovalStatus.AWAITING_PAYMENT:
        return ApprovalStatus.CANCELLED if state.cancelled else None
    return state.status


def _sortable(moment: datetime | None, *, missing: float) -> float:
    return moment.timestamp() if moment is not None else missing


class ChangelogTail:
    """Feeds an `ApprovalsView` from every partition of the approval changelog until stopped."""

    def __init__(self, settings: ChoreoSettings, view: ApprovalsView, *, poll_ms: int = 100) -> None:
        self.settings = settings
        self.view = view
        self.poll_ms = poll_ms
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.partitions: list[int] = []

    async def start(self, *, metadata_timeout: float = 30.0) -> None:
        consumer = make_consumer(self.settings, group_id=None)
        await consumer.start()
        self._consumer = consumer
        try:
            topic = self.settings.topic(APPROVAL_STATE)
            async with asyncio.timeout(metadata_timeout):
                self.partitions = await _partitions(consumer, topic)
            tps = [TopicPartition(topic, p) for p in self.partitions]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
        except TimeoutError:
            await consumer.stop()
            self._consumer = None
            missing = f"topic {topic} has no partitions; create the topics first (choreo topics create)"
            raise RuntimeError(missing) from None
        except BaseException:
            await consumer.stop()
            self._consumer = None
            raise
        self._task = asyncio.create_task(self._follow(consumer, ends), name="approval-changelog-tail")
        log.info("reading the approval changelog", extra={"topic": topic, "partitions": self.partitions})

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _follow(self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> None:
        behind = {tp for tp, end in ends.items() if end > 0}
        if not behind:
            self.view.mark_caught_up()
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=self.poll_ms)
            except KafkaError:
                # The consumer reconnects by itself; the view just stays as it was meanwhile.
                log.exception("changelog read failed; retrying")
                await asyncio.sleep(1)
                continue
            for records in batch.values():
                for record in records:
                    if record.key is not None:
                        self.view.apply(record.key.decode(errors="replace"), record.value)
            if behind:
                behind = {tp for tp in behind if await consumer.position(tp) < ends[tp]}
                if not behind:
                    self.view.mark_caught_up()
                    log.info("approval read model caught up", extra={"approvals": len(self.view)})


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    while True:
        found: Iterable[int] | None = consumer.partitions_for_topic(topic)
        if found:
            return sorted(found)
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.2)

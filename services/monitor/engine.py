"""What the monitor does on each audited event and each timer tick, against a store and a few ports.

The faust app (`app.py`) supplies the real store (a table on `monitor.state`) and ports (Kafka, HTTP);
tests supply in-memory ones. Nothing here holds state that is not in the store, except `processed`
(rebuilt on start from the store and the group's committed offsets) and `recently_finished` (bounded,
and empty after a restart).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import BaseModel, ValidationError

from schemas.envelope import ContractError, Envelope
from services.common.tracing import ORDER_ID_ATTRIBUTE, TRACER_NAME, from_traceparent
from services.monitor.domain import (
    SAGA_PREFIX,
    SERVICE_PREFIX,
    CheckResult,
    HealthPolicy,
    PartitionStats,
    PendingAlert,
    SagaRecord,
    ServiceHealth,
    apply_event,
    digest,
    new_service,
    observe,
    overdue,
    saga_key,
    service_key,
    stats_key,
    stuck_alert,
)
from services.monitor.metrics import MonitorMetrics
from services.monitor.settings import MonitorSettings
from services.monitor.store import StateStore

log = logging.getLogger(__name__)

# Service records live in this partition of `monitor.state`; whoever owns partition 0 of `audit`
# owns them, so two monitor instances never check the same service.
HEALTH_PARTITION = 0
# Orders remembered after their terminal event, so that a straggler (a placement overtaken by its own
# cancellation) does not reopen them; bounded, and rebuilt empty after a restart.
RECENTLY_FINISHED = 1_000
# The alert's record timestamp is taken by the producer after `since_ms`; the margin covers clock steps.
CLOCK_MARGIN_MS = 1_000

M = TypeVar("M", bound=BaseModel)


class Ports(Protocol):
    async def send_alert(self, envelope: Envelope) -> None:
        """Publish on `monitor.alerts` and wait for the broker's acknowledgement."""

    async def flush(self) -> None:
        """Wait until every state write made so far is acknowledged by the broker."""

    async def check(self, url: str, timeout_s: float) -> tuple[bool, str]:
        """One health request: (healthy, detail)."""

    async def alert_published(self, pending: PendingAlert) -> bool:
        """Whether `pending`'s event is already on `monitor.alerts`."""

    async def caught_up(self, partition: int, processed_offset: int) -> bool:
        """Whether no committed audit record of `partition` lies beyond `processed_offset`."""

    def owned_partitions(self) -> set[int]:
        """Partitions of `audit` (and so of `monitor.state`) this instance owns now."""

    async def resume_offsets(self) -> dict[int, int]:
        """Per audit partition, the offset the monitor's consumer group resumes from (its commit)."""


@dataclass(frozen=True)
class Raise:
    key: str
    record: ServiceHealth | SagaRecord
    alert: Envelope
    partition: int


def utc_now() -> datetime:
    return datetime.now(UTC)


class MonitorEngine:
    def __init__(
        self,
        settings: MonitorSettings,
        store: StateStore,
        ports: Ports,
        clock: Callable[[], datetime] = utc_now,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        metrics: MonitorMetrics | None = None,
    ) -> None:
        self.settings = settings
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self.tracer = provider.get_tracer(TRACER_NAME)
        self.metrics = metrics if metrics is not None else MonitorMetrics(targets=tuple(settings.monitor_targets))
        self.store = store
        self.ports = ports
        self.clock = clock
        self.policy = HealthPolicy(
            interval=settings.monitor_interval,
            unhealthy_interval=settings.unhealthy_interval,
            failure_threshold=settings.monitor_failure_threshold,
        )
        self.processed: dict[int, int] = {}
        self.recently_finished: OrderedDict[str, None] = OrderedDict()
        self.checks_done = 0
        self.sla_rounds = 0
        self.alerts_sent = 0
        self._batch_stats: dict[int, PartitionStats] = {}
        self._batch_finished: list[tuple[str, int]] = []

    # --- typed access -----------------------------------------------------------------------------

    def load(self, key: str, model: type[M]) -> M | None:
        raw = self.store.get(key)
        if raw is None:
            return None
        try:
            return model.model_validate_json(raw)
        except ValidationError:
            log.exception("unreadable monitor record; treated as absent", extra={"key": key})
            return None

    def save(self, key: str, record: BaseModel, partition: int) -> None:
        self.store.put(key, record.model_dump_json().encode(), partition)

    def stats(self, partition: int) -> PartitionStats:
        return (
            self._batch_stats.get(partition)
            or self.load(stats_key(partition), PartitionStats)
            or PartitionStats(partition=partition)
        )

    # --- audit ------------------------------------------------------------------------------------

    def apply(self, partition: int, offset: int, value: bytes | None, traceparent: str | None = None) -> None:
        """Follow one record of `audit`; a replay of a record already applied changes nothing.

        A saga record carries the offset of its last event, so replaying that event is a no-op. A
        finished saga has no record any more, so its partition's `sla:<p>` remembers the offset of the
        last terminal event counted: nothing at or before it is applied again (every write it implies
        went to the same partition of `monitor.state` before that record did).
        """
        self.processed[partition] = max(offset, self.processed.get(partition, -1))
        stats = self.stats(partition)
        if offset <= stats.offset:
            return
        try:
            envelope = Envelope.from_bytes(value)
        except ContractError as error:
            # The audit service validated it already; whatever this is, it is not a saga event.
            log.warning(
                "unreadable audit record skipped",
                extra={"partition": partition, "offset": offset, "reason": error.reason},
            )
            return
        key = saga_key(envelope.order_id)
        saga = self.load(key, SagaRecord)
        if saga is not None and saga.finished_at is not None:
            if saga.offset == offset:
                # The terminal event applied before a crash cut the batch short: count it now.
                self._finish(key, partition, offset, (saga.finished_at - saga.opened_at).total_seconds())
            return
        if saga is None and envelope.order_id in self.recently_finished:
            return
        change = apply_event(saga, envelope, partition, offset, traceparent)
        if change.record is not None:
            self.save(key, change.record, partition)
        if change.latency is not None:
            self._finish(key, partition, offset, change.latency)
            self._remember_finished(envelope.order_id)

    def _finish(self, key: str, partition: int, offset: int, latency: float) -> None:
        finished = self.stats(partition).finish(latency)
        self._batch_stats[partition] = finished.model_copy(update={"offset": offset})
        self._batch_finished.append((key, partition))

    def end_batch(self) -> None:
        """Store the latencies of the sagas the batch finished, then delete those sagas.

        Within one partition of `monitor.state` the writes reach the broker in this order, so a crash
        leaves either a finished saga not yet counted (counted on replay from its record) or a counted
        one not yet deleted (deleted by `reconcile`), never a count without its saga. A batch that
        finished nothing writes no `sla:<p>`: the state topic only grows by what changed.
        """
        for partition, stats in self._batch_stats.items():
            self.save(stats_key(partition), stats, partition)
        for key, partition in self._batch_finished:
            self.store.delete(key, partition)
        self._batch_stats.clear()
        self._batch_finished.clear()

    def _remember_finished(self, order_id: str) -> None:
        self.recently_finished[order_id] = None
        if len(self.recently_finished) > RECENTLY_FINISHED:
            self.recently_finished.popitem(last=False)

    # --- after every (re)assignment -------------------------------------------------------------

    def snapshot(self) -> dict[str, bytes]:
        return {key: value for key in self.store.keys("") if (value := self.store.get(key)) is not None}

    async def reconcile(self) -> None:
        """Settle what a crash may have left half done, before any new decision is taken."""
        owned = self.ports.owned_partitions()
        resume = await self.ports.resume_offsets()
        restored = self.snapshot()
        log.info(
            "monitor state restored",
            extra={"records": len(restored), "digest": digest(restored), "partitions": sorted(owned)},
        )
        for partition in owned:
            # Everything before where the consumer resumes was processed before the restart.
            done = max(self.stats(partition).offset, resume.get(partition, 0) - 1)
            self.processed[partition] = max(self.processed.get(partition, -1), done)
        if HEALTH_PARTITION in owned:
            for key in self.store.keys(SERVICE_PREFIX):
                name = key.removeprefix(SERVICE_PREFIX)
                if name not in self.settings.monitor_targets:
                    self.store.delete(key, HEALTH_PARTITION)
                    continue
                health = self.load(key, ServiceHealth)
                if health is not None and health.pending is not None:
                    await self._settle_pending(key, health, health.pending, HEALTH_PARTITION)
        for key in self.store.keys(SAGA_PREFIX):
            saga = self.load(key, SagaRecord)
            if saga is None or saga.partition not in owned:
                continue
            if saga.finished_at is not None:
                if saga.offset <= self.stats(saga.partition).offset:
                    self.store.delete(key, saga.partition)
                continue
            if saga.pending is not None:
                await self._settle_pending(key, saga, saga.pending, saga.partition)
        await self.ports.flush()

    async def _settle_pending(
        self, key: str, record: ServiceHealth | SagaRecord, pending: PendingAlert, partition: int
    ) -> None:
        if await self.ports.alert_published(pending):
            log.info("pending alert was already published", extra={"subject": pending.subject})
        else:
            alert = pending.to_envelope()
            await self._send(alert, record)
            self.alerts_sent += 1
            self.metrics.alerted(alert.type)
            log.warning("pending alert published after a restart", extra={"subject": pending.subject})
        self.save(key, record.model_copy(update={"pending": None}), partition)

    # --- health -----------------------------------------------------------------------------------

    async def check_health(self) -> int:
        """Check every service that is due; returns how many were checked."""
        if HEALTH_PARTITION not in self.ports.owned_partitions():
            return 0
        now = self.clock()
        due: list[ServiceHealth] = []
        for name, url in self.settings.monitor_targets.items():
            health = self.load(service_key(name), ServiceHealth) or new_service(name, url, now)
            if health.url != url:
                health = health.model_copy(update={"url": url})
            if health.pending is None and health.next_check_at <= now:
                due.append(health)
        if not due:
            return 0
        outcomes = await asyncio.gather(
            *(self.ports.check(health.url, self.settings.monitor_check_timeout) for health in due)
        )
        raises: list[Raise] = []
        for health, (ok, detail) in zip(due, outcomes, strict=True):
            result = CheckResult(ok=ok, detail=detail, at=self.clock())
            self.metrics.checked(health.service, ok)
            updated, alert = observe(health, result, self.policy)
            key = service_key(health.service)
            if alert is None:
                self.save(key, updated, HEALTH_PARTITION)
            else:
                raises.append(Raise(key, updated, alert, HEALTH_PARTITION))
        self.checks_done += len(due)
        await self._raise(raises)
        await self.ports.flush()  # a check, once served on /monitor/services, survives a crash
        return len(due)

    # --- SLA --------------------------------------------------------------------------------------

    async def check_sagas(self) -> int:
        """Flag every saga of an owned partition that outlived the SLA; returns how many were flagged."""
        now = self.clock()
        sla = self.settings.monitor_saga_sla
        owned = self.ports.owned_partitions()
        candidates: dict[int, list[str]] = {}
        for key in self.store.keys(SAGA_PREFIX):
            saga = self.load(key, SagaRecord)
            if saga is not None and saga.partition in owned and overdue(saga, now, sla):
                candidates.setdefault(saga.partition, []).append(key)
        raises: list[Raise] = []
        for partition, keys in sorted(candidates.items()):
            # While the monitor is behind on a partition, its terminal events may just be unread yet.
            if not await self.ports.caught_up(partition, self.processed.get(partition, -1)):
                continue
            for key in keys:
                saga = self.load(key, SagaRecord)  # again: the stream may have moved on meanwhile
                if saga is not None and overdue(saga, now, sla):
                    flagged = saga.model_copy(update={"stuck_at": now})
                    raises.append(Raise(key, flagged, stuck_alert(saga, now, sla), partition))
        await self._raise(raises)
        self.sla_rounds += 1
        self.metrics.sla_rounds.inc()
        return len(raises)

    # --- alerts -----------------------------------------------------------------------------------

    async def _send(self, alert: Envelope, record: ServiceHealth | SagaRecord) -> None:
        """Publish `alert` in a PRODUCER span: a stuck saga's in the order's trace, a service's in a new one."""
        parent = record.traceparent if isinstance(record, SagaRecord) else None
        with self.tracer.start_as_current_span(
            f"monitor publish {alert.type}", context=from_traceparent(parent), kind=SpanKind.PRODUCER
        ) as span:
            if span.is_recording():
                span.set_attribute(
                    ORDER_ID_ATTRIBUTE if isinstance(record, SagaRecord) else "choreo.subject", alert.order_id
                )
            await self.ports.send_alert(alert)

    async def _raise(self, raises: Sequence[Raise]) -> None:
        """Record the intent, make it durable, publish, then clear the intent: once per decision."""
        if not raises:
            return
        since_ms = int(time.time() * 1000) - CLOCK_MARGIN_MS
        for item in raises:
            pending = PendingAlert.of(item.alert, since_ms)
            self.save(item.key, item.record.model_copy(update={"pending": pending}), item.partition)
        await self.ports.flush()
        for item in raises:
            await self._send(item.alert, item.record)
            self.alerts_sent += 1
            self.metrics.alerted(item.alert.type)
            log.warning("alert raised", extra={"type": item.alert.type, "subject": item.alert.order_id})
            current = self.load(item.key, type(item.record))
            # The stream may have deleted a saga that finished while the alert was in flight.
            if current is not None and current.pending is not None and current.pending.event_id == item.alert.event_id:
                self.save(item.key, current.model_copy(update={"pending": None}), item.partition)

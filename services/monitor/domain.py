"""The monitor's records and the pure rules that change them: no Kafka, no HTTP, no clock of its own.

Every record lives under one key of `monitor.state` and is rewritten whole when it changes:
`service:<name>` (health of one service), `saga:<order_id>` (one saga in flight) and `sla:<p>`
(progress through partition p of `audit` and the latency histogram of the orders finished there).
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.envelope import Envelope, Source
from schemas.events import (
    TERMINAL_EVENTS,
    Event,
    OrderPlaced,
    SagaStuck,
    ServiceDegraded,
    ServiceRecovered,
)

SERVICE_PREFIX = "service:"
SAGA_PREFIX = "saga:"
STATS_PREFIX = "sla:"
# Service alerts have no causing event, so their ids are derived from the subject and the change number:
# the same status change always yields the same event_id, however often it is (re)sent.
ALERT_NAMESPACE = uuid.UUID("0b6c1f3e-7a52-4d8e-8c1a-5f3e9d2b4a71")
REASON_MAX = 500


def digest(records: Mapping[str, bytes]) -> str:
    """A hash of a whole state (key -> record): equal digests mean equal states."""
    content = hashlib.sha256()
    for key in sorted(records):
        content.update(key.encode() + b"\0" + records[key] + b"\0")
    return content.hexdigest()


def service_key(name: str) -> str:
    return f"{SERVICE_PREFIX}{name}"


def saga_key(order_id: str) -> str:
    return f"{SAGA_PREFIX}{order_id}"


def stats_key(partition: int) -> str:
    return f"{STATS_PREFIX}{partition}"


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PendingAlert(Record):
    """An alert decided but not yet known to be on `monitor.alerts`: written before the send, cleared after.

    After a crash the monitor looks for `event_id` on the alerts topic from `since_ms` on and sends the
    alert only if it is not there, so a restart neither loses nor repeats it.
    """

    envelope: str
    event_id: uuid.UUID
    subject: str
    since_ms: int

    @classmethod
    def of(cls, envelope: Envelope, since_ms: int) -> PendingAlert:
        return cls(
            envelope=envelope.model_dump_json(),
            event_id=envelope.event_id,
            subject=envelope.order_id,
            since_ms=since_ms,
        )

    def to_envelope(self) -> Envelope:
        return Envelope.from_bytes(self.envelope.encode())


# --- health ---------------------------------------------------------------------------------------

Status = Literal["unknown", "healthy", "degraded"]


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str
    at: datetime


@dataclass(frozen=True)
class HealthPolicy:
    interval: float
    unhealthy_interval: float
    failure_threshold: int


class ServiceHealth(Record):
    service: str
    url: str
    status: Status = "unknown"
    last_seen: datetime | None = Field(default=None, description="Time of the last successful check.")
    consecutive_failures: int = 0
    last_change: datetime | None = None
    check_count: int = 0
    changes: int = Field(default=0, description="Status changes that raised an alert; numbers the alert ids.")
    degraded_since: datetime | None = None
    last_error: str | None = None
    next_check_at: datetime
    pending: PendingAlert | None = None


def new_service(name: str, url: str, now: datetime) -> ServiceHealth:
    return ServiceHealth(service=name, url=url, next_check_at=now)


def observe(state: ServiceHealth, result: CheckResult, policy: HealthPolicy) -> tuple[ServiceHealth, Envelope | None]:
    """The service's state after one check, and the alert to raise when its status changed."""
    at = result.at
    checked = {"check_count": state.check_count + 1}
    if result.ok:
        if state.status == "degraded":
            since = state.degraded_since or state.last_change or at
            recovered = state.model_copy(
                update={
                    **checked,
                    "status": "healthy",
                    "last_seen": at,
                    "consecutive_failures": 0,
                    "last_change": at,
                    "changes": state.changes + 1,
                    "degraded_since": None,
                    "last_error": None,
                    "next_check_at": at + timedelta(seconds=policy.interval),
                }
            )
            recovered_event = ServiceRecovered(
                service=state.service, degraded_for_seconds=max(0.0, (at - since).total_seconds())
            )
            return recovered, _service_alert(recovered, recovered_event, at)
        return (
            state.model_copy(
                update={
                    **checked,
                    "status": "healthy",
                    "last_seen": at,
                    "consecutive_failures": 0,
                    # unknown -> healthy is the first sighting, not a change worth an alert
                    "last_change": state.last_change if state.status == "healthy" else at,
                    "last_error": None,
                    "next_check_at": at + timedelta(seconds=policy.interval),
                }
            ),
            None,
        )
    failures = state.consecutive_failures + 1
    failed = {
        **checked,
        "consecutive_failures": failures,
        "last_error": result.detail[:REASON_MAX] or "failed",
        # a failing service is looked at more often, so its recovery is noticed sooner
        "next_check_at": at + timedelta(seconds=policy.unhealthy_interval),
    }
    if state.status != "degraded" and failures >= policy.failure_threshold:
        degraded = state.model_copy(
            update={
                **failed,
                "status": "degraded",
                "last_change": at,
                "degraded_since": at,
                "changes": state.changes + 1,
            }
        )
        event = ServiceDegraded(
            service=state.service,
            reason=result.detail[:REASON_MAX] or "failed",
            consecutive_failures=failures,
            last_seen=state.last_seen,
        )
        return degraded, _service_alert(degraded, event, at)
    return state.model_copy(update=failed), None


def _service_alert(state: ServiceHealth, event: Event, at: datetime) -> Envelope:
    subject = service_key(state.service)
    event_id = uuid.uuid5(ALERT_NAMESPACE, f"{subject}/{state.changes}/{type(event).__name__}")
    return Envelope.new(event, order_id=subject, source=Source.MONITOR, event_id=event_id, occurred_at=at)


# --- sagas ----------------------------------------------------------------------------------------


class SagaRecord(Record):
    order_id: str
    partition: int
    offset: int = Field(description="Offset in the audit partition of the last event applied to this record.")
    opened_at: datetime
    customer_id: str | None = None
    last_event_type: str
    last_event_id: uuid.UUID
    last_event_at: datetime
    events: int = 1
    finished_at: datetime | None = Field(
        default=None, description="Set by the terminal event; the record is deleted once its latency is counted."
    )
    stuck_at: datetime | None = None
    pending: PendingAlert | None = None
    traceparent: str | None = Field(
        default=None, description="W3C trace context of the last audit record applied: a SagaStuck joins its trace."
    )


@dataclass(frozen=True)
class SagaChange:
    """What one audited event does to its saga: the new record (None: untouched) and a finished latency."""

    record: SagaRecord | None
    latency: float | None = None


UNCHANGED = SagaChange(None)


def apply_event(
    saga: SagaRecord | None, envelope: Envelope, partition: int, offset: int, traceparent: str | None = None
) -> SagaChange:
    """Follow one event of the audit topic; idempotent per audit offset."""
    at = envelope.occurred_at
    terminal = type(envelope.data) in TERMINAL_EVENTS
    if saga is None:
        # Only a placement opens a saga: events after the end (a refused cancellation, an ignored
        # decision) and events of orders placed before the monitor's history began are not followed.
        if not isinstance(envelope.data, OrderPlaced):
            return UNCHANGED
        return SagaChange(
            SagaRecord(
                order_id=envelope.order_id,
                partition=partition,
                offset=offset,
                opened_at=at,
                customer_id=envelope.data.customer_id,
                last_event_type=envelope.type,
                last_event_id=envelope.event_id,
                last_event_at=at,
                traceparent=traceparent,
            )
        )
    if offset <= saga.offset or saga.finished_at is not None:
        return UNCHANGED
    seen = {
        "offset": offset,
        "last_event_type": envelope.type,
        "last_event_id": envelope.event_id,
        "last_event_at": at,
        "events": saga.events + 1,
        "traceparent": traceparent or saga.traceparent,
    }
    if terminal:
        finished = saga.model_copy(update={**seen, "finished_at": at})
        return SagaChange(finished, latency=max(0.0, (at - saga.opened_at).total_seconds()))
    return SagaChange(saga.model_copy(update=seen))


def overdue(saga: SagaRecord, now: datetime, sla_seconds: float) -> bool:
    return (
        saga.finished_at is None
        and saga.stuck_at is None
        and saga.pending is None
        and (now - saga.opened_at).total_seconds() > sla_seconds
    )


def stuck_alert(saga: SagaRecord, now: datetime, sla_seconds: float) -> Envelope:
    event = SagaStuck(
        sla_seconds=sla_seconds,
        open_for_seconds=max(0.0, (now - saga.opened_at).total_seconds()),
        last_event_type=saga.last_event_type,
    )
    # Caused by the last event seen: re-deciding the same alert yields the same event_id.
    return Envelope.new(event, order_id=saga.order_id, source=Source.MONITOR, cause=saga.last_event_id, occurred_at=now)


# --- latency --------------------------------------------------------------------------------------

BUCKET_BASE = 0.01  # seconds: the upper bound of bucket 0
BUCKET_FACTOR = 1.25  # each bucket is 25 % wider than the one before: percentiles within 25 %
BUCKETS = 80  # bucket 80 holds everything above 0.01 * 1.25**79 s (about 5 days)


def bucket_of(seconds: float) -> int:
    if seconds <= BUCKET_BASE:
        return 0
    return min(BUCKETS, math.ceil(math.log(seconds / BUCKET_BASE, BUCKET_FACTOR) - 1e-9))


def bucket_upper(index: int) -> float:
    return BUCKET_BASE * BUCKET_FACTOR**index


class LatencyHistogram(Record):
    """Order-to-terminal latencies in fixed log-scale buckets: its size never grows with the count."""

    counts: dict[int, int] = Field(default_factory=dict)
    count: int = 0
    total_seconds: float = 0.0
    max_seconds: float = 0.0

    def add(self, seconds: float) -> LatencyHistogram:
        index = bucket_of(seconds)
        counts = dict(self.counts)
        counts[index] = counts.get(index, 0) + 1
        return LatencyHistogram(
            counts=counts,
            count=self.count + 1,
            total_seconds=self.total_seconds + seconds,
            max_seconds=max(self.max_seconds, seconds),
        )

    @classmethod
    def merge(cls, histograms: list[LatencyHistogram]) -> LatencyHistogram:
        counts: dict[int, int] = {}
        for histogram in histograms:
            for index, count in histogram.counts.items():
                counts[index] = counts.get(index, 0) + count
        return cls(
            counts=counts,
            count=sum(h.count for h in histograms),
            total_seconds=sum(h.total_seconds for h in histograms),
            max_seconds=max((h.max_seconds for h in histograms), default=0.0),
        )

    def percentile(self, q: float) -> float | None:
        """An upper estimate of the q-quantile (0 < q <= 1): the bound of its bucket, at most the maximum."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(bucket_upper(index), self.max_seconds)
        return self.max_seconds


class PartitionStats(Record):
    partition: int
    offset: int = Field(
        default=-1, description="Offset of the last terminal event counted; nothing up to it is applied again."
    )
    latency: LatencyHistogram = Field(default_factory=LatencyHistogram)
    finished: int = 0

    def finish(self, latency: float) -> PartitionStats:
        return self.model_copy(update={"latency": self.latency.add(latency), "finished": self.finished + 1})

"""The monitor's engine over an in-memory store and fake ports: every crash window, replays, the SLA."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from schemas.envelope import Envelope
from services.common.tracing import current_trace_headers, traceparent_of
from services.monitor.domain import (
    PartitionStats,
    PendingAlert,
    SagaRecord,
    ServiceHealth,
    saga_key,
    service_key,
    stats_key,
)
from services.monitor.engine import MonitorEngine
from services.monitor.settings import MonitorSettings
from services.monitor.store import MemoryStore
from tests.monitor.factories import T0, cancelled, placed, saga

URL = "http://svc/health"


class SimulatedCrashError(Exception):
    """The process dies here."""


class FakePorts:
    def __init__(self) -> None:
        self.published: list[Envelope] = []
        self.healthy: dict[str, bool] = {URL: True}
        self.behind: set[int] = set()
        self.crash_before_send = False
        self.crash_after_send = False
        self.owned = {0, 1, 2}

    async def send_alert(self, envelope: Envelope) -> None:
        if self.crash_before_send:
            raise SimulatedCrashError
        self.published.append(envelope)
        if self.crash_after_send:
            raise SimulatedCrashError

    async def flush(self) -> None:
        return None

    async def check(self, url: str, timeout_s: float) -> tuple[bool, str]:
        return (True, "HTTP 200") if self.healthy[url] else (False, "ConnectError")

    async def alert_published(self, pending: PendingAlert) -> bool:
        return any(envelope.event_id == pending.event_id for envelope in self.published)

    async def caught_up(self, partition: int, processed_offset: int) -> bool:
        return partition not in self.behind

    def owned_partitions(self) -> set[int]:
        return self.owned

    async def resume_offsets(self) -> dict[int, int]:
        return {}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


SETTINGS = MonitorSettings(
    monitor_interval=10, monitor_failure_threshold=2, monitor_targets={"svc": URL}, monitor_saga_sla=60
)


def engine(store: MemoryStore, ports: FakePorts, clock: Clock) -> MonitorEngine:
    return MonitorEngine(SETTINGS, store, ports, clock)


def feed(monitor: MonitorEngine, partition: int, first_offset: int, envelopes: list[Envelope]) -> int:
    offset = first_offset
    for envelope in envelopes:
        monitor.apply(partition, offset, envelope.to_bytes())
        offset += 1
    monitor.end_batch()
    return offset


def health(store: MemoryStore) -> ServiceHealth:
    return ServiceHealth.model_validate_json(store.data[service_key("svc")])


def stats(store: MemoryStore, partition: int) -> PartitionStats:
    return PartitionStats.model_validate_json(store.data[stats_key(partition)])


async def degrade(monitor: MonitorEngine, ports: FakePorts, clock: Clock) -> None:
    await monitor.check_health()
    ports.healthy[URL] = False
    for _ in range(2):
        clock.advance(10)
        await monitor.check_health()


async def test_a_status_change_is_alerted_once_and_the_service_is_checked_faster_while_failing() -> None:
    store, ports, clock = MemoryStore(), FakePorts(), Clock()
    monitor = engine(store, ports, clock)
    await monitor.reconcile()
    await monitor.check_health()
    clock.advance(5)
    assert await monitor.check_health() == 0  # not due yet
    ports.healthy[URL] = False
    clock.advance(5)
    await monitor.check_health()
    assert health(store).next_check_at == clock.now + timedelta(seconds=2.5)
    clock.advance(2.5)
    await monitor.check_health()
    assert [e.type for e in ports.published] == ["ServiceDegraded"]
    assert health(store).pending is None
    assert health(store).status == "degraded"
    for _ in range(5):
        clock.advance(2.5)
        await monitor.check_health()
    ports.healthy[URL] = True
    clock.advance(2.5)
    await monitor.check_health()
    assert [e.type for e in ports.published] == ["ServiceDegraded", "ServiceRecovered"]
    assert health(store).check_count == 9


@pytest.mark.parametrize("window", ["before_send", "after_send"])
async def test_a_crash_around_the_send_neither_loses_nor_repeats_the_alert(window: str) -> None:
    store, ports, clock = MemoryStore(), FakePorts(), Clock()
    monitor = engine(store, ports, clock)
    await monitor.reconcile()
    ports.crash_before_send = window == "before_send"
    ports.crash_after_send = window == "after_send"
    with pytest.raises(SimulatedCrashError):
        await degrade(monitor, ports, clock)
    assert health(store).pending is not None  # the intent was stored before the send
    ports.crash_before_send = ports.crash_after_send = False

    restarted = engine(store, ports, clock)  # same store: what the changelog restores
    await restarted.reconcile()
    await restarted.reconcile()
    assert [e.type for e in ports.published] == ["ServiceDegraded"]
    assert health(store).pending is None
    assert health(store).status == "degraded"
    clock.advance(10)
    await restarted.check_health()
    assert len(ports.published) == 1


async def test_replaying_applied_audit_records_changes_nothing() -> None:
    store, ports, clock = MemoryStore(), FakePorts(), Clock()
    monitor = engine(store, ports, clock)
    records = saga("A") + saga("B", finish=False)
    feed(monitor, 0, 100, records)
    before = dict(store.data)
    replayed = engine(store, ports, clock)
    feed(replayed, 0, 100, records)
    assert store.data == before
    assert stats(store, 0).latency.count == 1
    assert stats(store, 0).offset == 103  # the terminal event of A
    assert saga_key("A") not in store.data
    assert saga_key("B") in store.data


async def test_a_crash_between_the_terminal_event_and_the_batch_end_counts_the_latency_once() -> None:
    store, ports, clock = MemoryStore(), FakePorts(), Clock()
    monitor = engine(store, ports, clock)
    records = saga("A")
    for offset, envelope in enumerate(records):
        monitor.apply(0, offset, envelope.to_bytes())
    # crash: the finished saga is stored, the batch's progress and the tombstone are not
    assert SagaRecord.model_validate_json(store.data[saga_key("A")]).finished_at is not None
    restarted = engine(store, ports, clock)
    await restarted.reconcile()
    assert saga_key("A") in store.data  # not counted yet, so kept for the replay
    feed(restarted, 0, 0, records)
    assert stats(store, 0).latency.count == 1
    assert stats(store, 0).finished == 1
    assert saga_key("A") not in store.data


async def test_a_counted_saga_whose_tombstone_was_lost_is_deleted_on_restart() -> None:
    store, ports, clock = MemoryStore(), FakePorts(), Clock()
    monitor = engine(store, ports, clock)
    records = saga("A")
    feed(monitor, 0, 0, records)
    assert [key for key, _, _ in store.writes[-2:]] == [stats_key(0), saga_key("A")]  # progress, then tombstone
    finished = [value for key, value, _ in store.writes if key == saga_key("A") and value is not None][-1]
    store.data[saga_key("A")] = finished  # as if the tombstone never reached the broker
    restarted = engine(store, ports, clock)
    await restarted.reconcile()
    assert saga_key("A") not in store.data
    feed(restarted, 0, 0, records)
    assert stats(store, 0).latency.count == 1


async def test_a_stuck_saga_is_flagged_once_and_only_when_the_monitor_has_caught_up() -> None:
    store, ports, clock = MemoryStore(), FakePorts(), Clock()
    clock.now = T0
    monitor = engine(store, ports, clock)
    feed(monitor, 1, 0, saga("OPEN", finish=False) + saga("DONE"))
    clock.advance(61)
    ports.behind = {1}
    assert await monitor.check_sagas() == 0
    ports.behind = set()
    assert await monitor.check_sagas() == 1
    assert [(e.type, e.order_id) for e in ports.published] == [("SagaStuck", "OPEN")]
    for _ in range(3):
        clock.advance(30)
        assert await monitor.check_sagas() == 0
    record = SagaRecord.model_validate_json(store.data[saga_key("OPEN")])
    assert record.stuck_at is not None
    assert record.pending is None
    assert saga_key("DONE") not in store.data


async def test_a_stuck_alert_interrupted_by_a_crash_is_settled_once_on_restart() -> None:
    store, ports, clock = MemoryStore(), FakePorts(), Clock()
    monitor = engine(store, ports, clock)
    feed(monitor, 2, 0, saga("OPEN", finish=False))
    clock.advance(61)
    ports.crash_after_send = True
    with pytest.raises(SimulatedCrashError):
        await monitor.check_sagas()
    ports.crash_after_send = False
    restarted = engine(store, ports, clock)
    await restarted.reconcile()
    clock.advance(61)
    await restarted.check_sagas()
    assert [e.type for e in ports.published] == ["SagaStuck"]


async def test_a_placement_overtaken_by_its_cancellation_does_not_reopen_the_order() -> None:
    store, ports, clock = MemoryStore(), FakePorts(), Clock()
    monitor = engine(store, ports, clock)
    first = placed("A")
    feed(monitor, 0, 0, [first, cancelled(first), placed("A", T0 + timedelta(seconds=5))])
    assert saga_key("A") not in store.data


async def test_partitions_owned_by_another_instance_and_removed_services_are_left_alone() -> None:
    store, ports, clock = MemoryStore(), FakePorts(), Clock()
    monitor = engine(store, ports, clock)
    feed(monitor, 2, 0, saga("OTHER", finish=False))
    store.put(service_key("gone"), store.data.get(service_key("svc"), b"{}"), 0)
    await monitor.reconcile()
    assert service_key("gone") not in store.data
    ports.owned = {1}
    clock.advance(61)
    assert await monitor.check_sagas() == 0
    assert await monitor.check_health() == 0


class TracedPorts(FakePorts):
    """Also records the trace context current when each alert is sent: what the record's headers carry."""

    def __init__(self) -> None:
        super().__init__()
        self.trace_contexts: list[tuple[tuple[str, bytes], ...]] = []

    async def send_alert(self, envelope: Envelope) -> None:
        self.trace_contexts.append(current_trace_headers())
        await super().send_alert(envelope)


async def test_a_stuck_saga_is_alerted_in_the_trace_of_its_last_audit_record() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store, ports, clock = MemoryStore(), TracedPorts(), Clock()
    monitor = MonitorEngine(SETTINGS, store, ports, clock, tracer_provider=provider)
    first, second = saga("OPEN", finish=False)[:2]
    last = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    monitor.apply(1, 0, first.to_bytes(), "00-0af7651916cd43dd8448eb211c80319c-1111111111111111-01")
    monitor.apply(1, 1, second.to_bytes(), last)
    monitor.end_batch()
    clock.advance(61)
    assert await monitor.check_sagas() == 1
    [span] = exporter.get_finished_spans()
    assert span.name == "monitor publish SagaStuck"
    assert span.kind is SpanKind.PRODUCER
    assert span.parent is not None
    assert (span.context.trace_id, span.parent.span_id) == (int(last.split("-")[1], 16), int(last.split("-")[2], 16))
    [headers] = ports.trace_contexts
    assert traceparent_of(headers) == f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"

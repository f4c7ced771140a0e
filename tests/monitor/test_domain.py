"""The monitor's pure rules: health transitions, saga following, SLA and latency buckets."""

from __future__ import annotations

from datetime import timedelta

import pytest

from schemas.events import SagaStuck, ServiceDegraded, ServiceRecovered
from services.monitor.domain import (
    BUCKETS,
    CheckResult,
    HealthPolicy,
    LatencyHistogram,
    apply_event,
    bucket_of,
    bucket_upper,
    new_service,
    observe,
    overdue,
    stuck_alert,
)
from services.monitor.settings import MonitorSettings
from tests.monitor.factories import T0, cancelled, placed, reserved, saga

POLICY = HealthPolicy(interval=300, unhealthy_interval=75, failure_threshold=2)


def ok(seconds: float) -> CheckResult:
    return CheckResult(ok=True, detail="HTTP 200", at=T0 + timedelta(seconds=seconds))


def fail(seconds: float) -> CheckResult:
    return CheckResult(ok=False, detail="ConnectError", at=T0 + timedelta(seconds=seconds))


def test_a_healthy_service_is_checked_at_the_normal_interval_and_raises_nothing() -> None:
    state, alert = observe(new_service("inventory", "http://x/health", T0), ok(0), POLICY)
    assert alert is None
    assert (state.status, state.check_count, state.consecutive_failures) == ("healthy", 1, 0)
    assert state.last_seen == T0
    assert state.last_change == T0
    assert state.next_check_at == T0 + timedelta(seconds=300)


def test_failures_shorten_the_interval_and_degrade_once_at_the_threshold() -> None:
    state, _ = observe(new_service("inventory", "http://x/health", T0), ok(0), POLICY)
    state, first = observe(state, fail(300), POLICY)
    assert first is None
    assert state.status == "healthy"
    assert state.consecutive_failures == 1
    assert state.next_check_at == T0 + timedelta(seconds=375)
    state, second = observe(state, fail(375), POLICY)
    assert second is not None
    assert isinstance(second.data, ServiceDegraded)
    assert second.order_id == "service:inventory"
    assert second.data.consecutive_failures == 2
    assert second.data.last_seen == T0
    assert state.status == "degraded"
    assert state.last_change == T0 + timedelta(seconds=375)
    state, third = observe(state, fail(450), POLICY)
    assert third is None
    assert state.consecutive_failures == 3
    assert state.check_count == 4


def test_a_degraded_service_recovers_on_one_success_and_backs_off_to_the_normal_interval() -> None:
    state = new_service("payment", "http://x/health", T0)
    for second in (0, 75):
        state, _ = observe(state, fail(second), POLICY)
    assert state.status == "degraded"
    state, alert = observe(state, ok(150), POLICY)
    assert alert is not None
    assert isinstance(alert.data, ServiceRecovered)
    assert alert.data.degraded_for_seconds == 75
    assert state.status == "healthy"
    assert state.consecutive_failures == 0
    assert state.next_check_at == T0 + timedelta(seconds=450)


def test_each_status_change_has_its_own_deterministic_alert_id() -> None:
    state = new_service("payment", "http://x/health", T0)
    ids = []
    for result in (fail(0), fail(1), ok(2), fail(3), fail(4)):
        again, _ = observe(state, result, POLICY)
        state, alert = observe(state, result, POLICY)
        assert again == state  # a pure function of its inputs
        if alert is not None:
            ids.append(alert.event_id)
    assert len(ids) == len(set(ids)) == 3


def test_only_a_placement_opens_a_saga_and_a_terminal_event_finishes_it_with_its_latency() -> None:
    events = saga("A")
    assert apply_event(None, events[1], 0, 1).record is None
    record = apply_event(None, events[0], 0, 10).record
    assert record is not None
    assert record.opened_at == T0
    assert record.customer_id == "C-1"
    record = apply_event(record, events[1], 0, 11).record
    assert record is not None
    assert record.events == 2
    assert record.last_event_type == "InventoryReserved"
    assert apply_event(record, events[1], 0, 11).record is None  # the same offset again: no change
    change = apply_event(record, events[3], 0, 12)
    assert change.record is not None
    assert change.record.finished_at == events[3].occurred_at
    assert change.latency == (events[3].occurred_at - T0).total_seconds()


def test_a_saga_is_overdue_after_the_sla_until_flagged_or_finished() -> None:
    first = placed("A")
    record = apply_event(None, first, 2, 0).record
    assert record is not None
    assert not overdue(record, T0 + timedelta(seconds=60), 60)
    assert overdue(record, T0 + timedelta(seconds=61), 60)
    alert = stuck_alert(record, T0 + timedelta(seconds=61), 60)
    assert isinstance(alert.data, SagaStuck)
    assert alert.data.open_for_seconds == 61
    assert alert.event_id == stuck_alert(record, T0 + timedelta(seconds=99), 60).event_id
    assert not overdue(record.model_copy(update={"stuck_at": T0}), T0 + timedelta(seconds=99), 60)
    finished = apply_event(record, cancelled(reserved(first)), 2, 1).record
    assert finished is not None
    assert not overdue(finished, T0 + timedelta(seconds=99), 60)


@pytest.mark.parametrize("seconds", [0.0, 0.01, 0.0101, 0.5, 3.0, 61.0, 3600.0, 86_400.0])
def test_a_latency_falls_in_the_bucket_whose_bound_is_within_25_percent_above_it(seconds: float) -> None:
    index = bucket_of(seconds)
    assert seconds <= bucket_upper(index)
    if index:
        assert bucket_upper(index - 1) < seconds <= bucket_upper(index) * 1.0000001


def test_percentiles_of_the_histogram_and_its_fixed_size() -> None:
    histogram = LatencyHistogram()
    for index in range(1, 1001):
        histogram = histogram.add(index / 100)  # 0.01 s .. 10 s
    assert histogram.count == 1000
    assert histogram.max_seconds == 10
    p50 = histogram.percentile(0.5)
    p99 = histogram.percentile(0.99)
    assert p50 is not None
    assert 5.0 <= p50 <= 5.0 * 1.25
    assert p99 is not None
    assert 9.9 <= p99 <= 10.0
    assert len(histogram.counts) <= BUCKETS + 1
    assert len(histogram.model_dump_json()) < 2_000
    merged = LatencyHistogram.merge([histogram, histogram])
    assert merged.count == 2000
    assert merged.percentile(0.5) == p50


def test_settings_parse_targets_from_json_and_derive_the_unhealthy_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOREO_MONITOR_TARGETS", '{"inventory": "http://inventory:8080/health"}')
    monkeypatch.setenv("CHOREO_MONITOR_INTERVAL", "0.4")
    settings = MonitorSettings()
    assert settings.monitor_targets == {"inventory": "http://inventory:8080/health"}
    assert settings.unhealthy_interval == pytest.approx(0.1)
    assert settings.health_port == 8104
    with pytest.raises(ValueError, match="not an http"):
        MonitorSettings(monitor_targets={"x": "ftp://x"})

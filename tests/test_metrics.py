"""The metrics without a broker: names and labels, reason categories, counts that follow commits, /metrics."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from schemas.envelope import Envelope, Source
from schemas.events import Address, ApprovalGranted, ApprovalRequested, OrderDetails, OrderLine, OrderPlaced
from schemas.topics import APPROVAL_DECISIONS, APPROVAL_EVENTS, ORDERS, PAYMENT_EVENTS, Topic
from services.approval.domain import ApprovalState, ApprovalStatus
from services.approval.metrics import ApprovalMetrics, PendingApprovals
from services.approval.readmodel import ApprovalsView
from services.audit.app import AuditApp
from services.audit.metrics import CANCELLATION_REASONS, AuditMetrics, cancellation_category
from services.common.kafka import partition_for
from services.common.metrics import DEAD_LETTER_REASONS, RunnerMetrics, dead_letter_category, exposition
from services.common.processor import Incoming, TaskContext, TransactionalRunner
from services.common.saga import order_key
from services.common.service import HealthServer, app_collectors
from services.common.settings import ChoreoSettings
from services.common.state import KeyedStore
from services.inventory.app import build_app as build_inventory
from services.inventory.settings import InventorySettings
from services.monitor.metrics import MonitorMetrics
from services.shipping.app import build_app as build_shipping
from services.shipping.settings import ShippingSettings
from tests.approval.support import DAY, T0, Harness, charged, decision
from tests.audit.builders import SCENARIOS, WAIT, record

# Every label any choreo_ metric may carry: none of them takes an order, customer, event or trace id.
BOUNDED_LABELS = frozenset({"service", "topic", "partition", "outcome", "reason", "step", "type", "decision", "target"})
PROMTOOL = "promtool"


def promtool_check(text: bytes) -> None:
    """`promtool check metrics` accepts the exposition: the format parses and every name passes its lint."""
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- reason categories -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        ("partition: key 'o-1' belongs on partition 3 (murmur2), not 1; publish with ...", "partition"),
        ("type: ShipmentScheduled is not carried on topic orders", "type"),
        ("key: the record key must equal order_id 'o-1'", "key"),
        ("not JSON: Expecting value: line 1 column 1 (char 0)", "json"),
        ("not a JSON object but list", "json"),
        ("value: empty message (null value)", "json"),
        ("data.items.0.quantity: Input should be greater than or equal to 1", "validation"),
        ("order_id: Field required; data: Field required", "validation"),
        ("invalid StockRequest: quantity: Input should be a valid integer", "validation"),
        ("expired: OrderPlaced for order 'o-1' occurred at 2025-01-01T00:00:00+00:00, before ...", "expired"),
        ("unknown order: PaymentCharged for order 'o-1', which was never placed ...", "unknown_order"),
        ("handler error: ValueError('boom')", "handler_error"),
        ("something nobody planned for", "other"),
        ("Weird Prefix: with a colon", "other"),
    ],
)
def test_a_dead_letter_reason_falls_in_a_fixed_category(reason: str, category: str) -> None:
    assert dead_letter_category(reason) == category
    assert category in DEAD_LETTER_REASONS


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        ("inventory rejected: insufficient stock: LIMITED-1 (requested 9, available 5)", "inventory_rejected"),
        ("payment declined: credit limit exceeded: available 10.00", "payment_declined"),
        ("payment refunded: approval denied", "approval_denied"),
        ("payment refunded: approval timed out", "approval_timed_out"),
        ("payment refunded: shipping failed: no carrier serves AQ", "shipping_failed"),
        ("payment refunded: order cancelled: changed my mind", "customer_request"),
        ("cancelled: order cancelled: changed my mind", "customer_request"),
        ("cancelled: approval denied", "approval_denied"),
        ("changed my mind", "other"),
    ],
)
def test_a_cancellation_reason_falls_in_a_fixed_category(reason: str, category: str) -> None:
    assert cancellation_category(reason) == category
    assert category in CANCELLATION_REASONS


# --- the runner's counts follow its commits ----------------------------------------------------------


def _order() -> OrderDetails:
    return OrderDetails(
        customer_id="c-1",
        items=[OrderLine(sku="WIDGET-1", quantity=1, unit_price=Decimal("5.00"))],
        currency="EUR",
        ship_to=Address(country="DE"),
    )


def _incoming(topic: Topic, envelope: Envelope | None, offset: int, value: bytes | None = None) -> Incoming:
    key = envelope.key if envelope is not None else b"o-bad"
    raw = envelope.to_bytes() if envelope is not None else value
    headers = envelope.headers() if envelope is not None else ()
    return Incoming(topic, 0, offset, key, raw, 0, headers)


def _shipping_runner() -> tuple[TransactionalRunner, TaskContext]:
    settings = ShippingSettings(_env_file=None, partitions=1, state_store="memory", environment="test")
    runner = TransactionalRunner(settings, build_shipping(settings))
    task = TaskContext(0, settings, runner.app.name, runner._store_factory.open(0))
    return runner, task


def _process(runner: TransactionalRunner, task: TaskContext, message: Incoming) -> None:
    """What the runner does with one record: its app handles it, a failure dead-letters it."""
    try:
        runner.app.process(task, message)
    except Exception as error:
        task.dead_letter(message, f"handler error: {error!r}")


def test_records_are_counted_by_topic_and_outcome_once_their_transaction_commits() -> None:
    runner, task = _shipping_runner()
    order = _order()
    granted = Envelope.new(
        ApprovalGranted(order=order, reviewer="system", reason="below threshold"),
        order_id="o-1",
        source=Source.APPROVAL,
    )
    requested = Envelope.new(
        ApprovalRequested(order=order, amount=Decimal("5.00"), currency="EUR", deadline=datetime.now().astimezone()),
        order_id="o-2",
        source=Source.APPROVAL,
    )
    _process(runner, task, _incoming(APPROVAL_EVENTS, granted, 0))
    _process(runner, task, _incoming(APPROVAL_EVENTS, requested, 1))  # shipping skips it unparsed
    _process(runner, task, _incoming(APPROVAL_EVENTS, None, 2, value=b"{not json"))
    registry = runner.metrics.registry
    processed = "choreo_records_processed_total"
    assert sample(registry, processed, service="shipping", topic="approval.events", outcome="handled") == 0

    runner._committed([task], 0.004)

    assert sample(registry, processed, service="shipping", topic="approval.events", outcome="handled") == 1
    assert sample(registry, processed, service="shipping", topic="approval.events", outcome="skipped") == 1
    assert sample(registry, processed, service="shipping", topic="approval.events", outcome="dead_lettered") == 1
    dead = sample(registry, "choreo_dead_letters_total", service="shipping", topic="approval.events", reason="json")
    assert dead == 1
    assert sample(registry, "choreo_transaction_records_sum", service="shipping") == 3
    assert sample(registry, "choreo_transaction_commit_duration_seconds_count", service="shipping") == 1


def test_a_failing_handler_counts_its_record_dead_lettered_for_a_handler_error() -> None:
    runner, task = _shipping_runner()

    def explode(task: TaskContext, message: Incoming) -> None:
        raise ValueError("boom")

    runner.app.wrapped.process = explode  # type: ignore[attr-defined]
    granted = Envelope.new(
        ApprovalGranted(order=_order(), reviewer="system", reason="below threshold"),
        order_id="o-1",
        source=Source.APPROVAL,
    )
    _process(runner, task, _incoming(APPROVAL_EVENTS, granted, 0))
    runner._committed([task], 0.001)

    registry = runner.metrics.registry
    labels = {"service": "shipping", "topic": "approval.events"}
    assert sample(registry, "choreo_records_processed_total", **labels, outcome="dead_lettered") == 1
    assert sample(registry, "choreo_records_processed_total", **labels, outcome="handled") == 0
    assert sample(registry, "choreo_dead_letters_total", **labels, reason="handler_error") == 1


def test_an_uncommitted_batch_counts_nothing_and_runs_no_callback() -> None:
    runner, task = _shipping_runner()
    ran: list[str] = []
    task.after_commit(lambda: ran.append("committed"))
    _process(runner, task, _incoming(ORDERS, None, 0, value=b"[]"))
    # The runner drops an aborted transaction's contexts whole: nothing reaches the counters.
    assert ran == []
    assert (
        sample(runner.metrics.registry, "choreo_dead_letters_total", service="shipping", topic="orders", reason="json")
        == 0
    )
    runner._committed([task], 0.001)
    assert ran == ["committed"]


# --- the audit's saga counts ------------------------------------------------------------------------


def _audit(scenarios: Sequence[str], *, repeat: int = 1) -> CollectorRegistry:
    """The audit's metrics after it read every event of `scenarios` `repeat` times, each batch committed."""
    app = AuditApp(causal_wait=WAIT)
    registry = CollectorRegistry()
    for collector in app_collectors(app):
        registry.register(collector)
    settings = ChoreoSettings(_env_file=None, partitions=6, topic_prefix="", state_store="memory")
    stores: dict[int, KeyedStore] = {}
    events = [envelope for name in scenarios for envelope in SCENARIOS[name]()]
    for _ in range(repeat):
        for envelope in events:
            message = record(envelope)
            store = stores.setdefault(message.partition, KeyedStore())
            task = TaskContext(message.partition, settings, "audit", store)
            app.process(task, message)
            store.commit()
            for callback in task.tally.callbacks:
                callback()
    return registry


def test_the_audit_counts_outcomes_compensations_retries_and_durations_from_what_it_writes() -> None:
    registry = _audit(["completed", "refund retried", "approval denied", "customer cancelled"])
    assert sample(registry, "choreo_saga_outcomes_total", outcome="completed") == 1
    assert sample(registry, "choreo_saga_outcomes_total", outcome="cancelled") == 3
    assert sample(registry, "choreo_refund_retries_total") == 2
    assert sample(registry, "choreo_saga_compensations_total", step="payment_refunded") == 2
    assert sample(registry, "choreo_saga_compensations_total", step="inventory_released") == 3
    assert sample(registry, "choreo_saga_compensations_total", step="payment_voided") == 1
    assert sample(registry, "choreo_saga_compensations_total", step="shipment_cancelled") == 1
    assert sample(registry, "choreo_saga_events_total", type="OrderPlaced") == 4
    # The hand-built sagas' reasons are not the services' own, so each is of category "other".
    assert sample(registry, "choreo_saga_cancellations_total", reason="other") == 3
    assert sample(registry, "choreo_saga_duration_seconds_count", outcome="cancelled") == 3
    # approval denied: placed at 0 s, cancelled at 63 s.
    assert sample(registry, "choreo_saga_duration_seconds_bucket", outcome="cancelled", le="60.0") == 2
    assert sample(registry, "choreo_saga_duration_seconds_bucket", outcome="cancelled", le="300.0") == 3


def test_a_redelivered_event_is_not_counted_again() -> None:
    once = _audit(["completed"])
    twice = _audit(["completed"], repeat=2)  # the same events, read again
    assert sample(twice, "choreo_saga_outcomes_total", outcome="completed") == sample(
        once, "choreo_saga_outcomes_total", outcome="completed"
    )


# --- names, labels and the exposition ---------------------------------------------------------------


def registry_of_every_metric() -> CollectorRegistry:
    """One registry holding every choreo metric, each with a sample, as the services would fill them."""
    registry = CollectorRegistry()
    runner = RunnerMetrics("inventory", registry)
    runner.follow([ORDERS], lambda: [("orders", 0, 7)])
    runner.dead_letters.labels("inventory", "orders", "json").inc()
    runner.batch_seconds.labels("inventory").observe(0.002)
    for metrics in (AuditMetrics(), ApprovalMetrics()):
        for collector in metrics.collectors():
            registry.register(collector)
    registry.register(PendingApprovals(lambda: 2))
    monitor = MonitorMetrics(registry, ("inventory",))
    monitor.checked("inventory", healthy=False)
    monitor.alerted("ServiceDegraded")
    return registry


def test_every_metric_is_prefixed_suffixed_and_bounded() -> None:
    families = list(text_string_to_metric_families(exposition(registry_of_every_metric()).decode()))
    assert families
    for family in families:
        assert family.name.startswith("choreo_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_records")), family.name
        for sample_ in family.samples:
            assert set(sample_.labels) - {"le"} <= BOUNDED_LABELS, (family.name, sample_.labels)
    names = {family.name for family in families}
    assert {
        "choreo_records_processed",
        "choreo_dead_letters",
        "choreo_batch_duration_seconds",
        "choreo_transaction_commit_duration_seconds",
        "choreo_transaction_records",
        "choreo_transaction_aborts",
        "choreo_consumer_lag_records",
        "choreo_assignments_taken",
        "choreo_assignments_revoked",
        "choreo_fenced_owners",
        "choreo_fenced",
        "choreo_saga_outcomes",
        "choreo_saga_cancellations",
        "choreo_saga_compensations",
        "choreo_refund_retries",
        "choreo_saga_duration_seconds",
        "choreo_saga_events",
        "choreo_approvals_pending",
        "choreo_approval_decisions",
        "choreo_monitor_checks",
        "choreo_monitor_sla_rounds",
        "choreo_monitor_alerts",
    } <= names


def test_promtool_accepts_the_exposition() -> None:
    promtool_check(exposition(registry_of_every_metric()))


async def test_the_health_server_serves_metrics_beside_health() -> None:
    registry = registry_of_every_metric()
    server = HealthServer("127.0.0.1", 0, lambda: (True, {"status": "ok"}), registry)
    port = await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            metrics = await client.get("/metrics")
            health = await client.get("/health")
            missing = await client.get("/nothing")
    finally:
        await server.stop()
    assert metrics.status_code == 200
    assert metrics.headers["content-type"] == CONTENT_TYPE_LATEST
    assert b"choreo_consumer_lag_records" in metrics.content
    promtool_check(metrics.content)
    assert health.json() == {"status": "ok"}
    assert missing.status_code == 404


async def test_a_health_server_without_a_registry_has_no_metrics() -> None:
    server = HealthServer("127.0.0.1", 0, lambda: (True, {}))
    port = await server.start()
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.get(f"http://127.0.0.1:{port}/metrics")
    finally:
        await server.stop()
    assert answer.status_code == 404


def test_the_wiring_registers_an_apps_own_collectors() -> None:
    audit = AuditApp(causal_wait=WAIT)
    assert list(app_collectors(audit)) == list(audit.metrics.collectors())
    assert app_collectors(build_shipping(ShippingSettings(_env_file=None))) == []


# --- approval ----------------------------------------------------------------------------------------


def test_decisions_are_counted_once_as_ruled_and_timeouts_with_them() -> None:
    harness = Harness()
    registry = CollectorRegistry()
    for collector in app_collectors(harness.app):
        registry.register(collector)
    for order_id in ("o-yes", "o-no", "o-late"):
        harness.feed(PAYMENT_EVENTS, charged(order_id))
    approve = decision("o-yes", approved=True)
    harness.feed(APPROVAL_DECISIONS, approve)
    harness.feed(APPROVAL_DECISIONS, approve)  # redelivered: ruled on before
    harness.feed(APPROVAL_DECISIONS, decision("o-no", approved=False))
    harness.feed(APPROVAL_DECISIONS, decision("o-no", approved=True, reviewer="bob"))  # too late: ignored
    harness.tick(T0 + DAY)  # o-late times out

    def decided(decision: str) -> float:
        return sample(registry, "choreo_approval_decisions_total", decision=decision)

    assert (decided("approved"), decided("denied"), decided("ignored"), decided("timed_out")) == (1, 1, 1, 1)

    view = ApprovalsView()
    pending = PendingApprovals(view.pending_count)
    for order_id in ("o-1", "o-2"):
        view.apply(
            order_key(order_id),
            ApprovalState(order_id=order_id, status=ApprovalStatus.PENDING).model_dump_json().encode(),
        )
    view.apply(
        order_key("o-2"), ApprovalState(order_id="o-2", status=ApprovalStatus.GRANTED).model_dump_json().encode()
    )
    view.apply(order_key("o-3"), None)
    [family] = pending.collect()
    assert [s.value for s in family.samples] == [1]


def test_a_misplaced_client_record_counts_forwarded_by_its_router_and_skipped_by_other_readers() -> None:
    # Given a client's order on another partition than its key's, read by the router and by shipping
    placed = Envelope.new(OrderPlaced(**_order().model_dump()), order_id="o-1", source=Source.CLIENT)
    right = partition_for(placed.key, 2)
    misplaced = Incoming(ORDERS, 1 - right, 5, placed.key, placed.to_bytes(), 0, placed.headers())
    counts: dict[str, dict[str, float]] = {}
    builds: tuple[tuple[ChoreoSettings, Any], ...] = (
        (InventorySettings(_env_file=None, partitions=2, state_store="memory", environment="test"), build_inventory),
        (ShippingSettings(_env_file=None, partitions=2, state_store="memory", environment="test"), build_shipping),
    )
    for settings, build in builds:
        runner = TransactionalRunner(settings, build(settings))
        task = TaskContext(1 - right, settings, runner.app.name, runner._store_factory.open(1 - right))
        # When each processes it and commits
        _process(runner, task, misplaced)
        runner._committed([task], 0.001)
        counts[runner.app.name] = {
            outcome: sample(runner.metrics.registry, "choreo_records_processed_total", service=runner.app.name,
                            topic="orders", outcome=outcome)
            for outcome in ("forwarded", "skipped", "handled")
        }  # fmt: skip
    # Then the router counts it forwarded, the other reader skipped, and neither handled it
    assert counts == {
        "inventory": {"forwarded": 1, "skipped": 0, "handled": 0},
        "shipping": {"forwarded": 0, "skipped": 1, "handled": 0},
    }

"""Given/When/Then tests of the inventory app, driven through real TaskContexts and in-memory stores."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from schemas.envelope import Envelope, Source
from schemas.events import (
    InventoryRejected,
    InventoryReleased,
    InventoryReserved,
    OrderCancellationRequested,
    OrderCancelled,
    OrderCompleted,
    OrderPlaced,
    PaymentCharged,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    ShipmentScheduled,
    Shortage,
    StockLine,
)
from schemas.topics import (
    INVENTORY_EVENTS,
    ORDERS,
    PAYMENT_EVENTS,
    SHIPPING_EVENTS,
    STOCK_REPLIES,
    STOCK_REQUESTS,
)
from services.common.kafka import partition_for
from services.inventory.app import build_app
from services.inventory.domain import (
    CatalogError,
    OrderStatus,
    SkuStock,
    StockOperation,
    StockReply,
    StockRequest,
    load_catalog,
)
from services.inventory.settings import DEFAULT_CATALOG, InventorySettings
from tests.inventory.cluster import CATALOG, Cluster, Step, caused, placed

EVENTS = INVENTORY_EVENTS.name


def declined(order_id: str, reason: str = "credit limit exceeded") -> Envelope:
    event = PaymentDeclined(customer_id="cust-1", amount=Decimal("19.98"), currency="EUR", reason=reason)
    return caused(event, order_id, Source.PAYMENT)


def refunded(order_id: str, reason: str = "shipping failed") -> Envelope:
    event = PaymentRefunded(customer_id="cust-1", amount=Decimal("19.98"), currency="EUR", reason=reason)
    return caused(event, order_id, Source.PAYMENT)


def voided(order_id: str, reason: str = "customer request") -> Envelope:
    return caused(PaymentVoided(reason=reason), order_id, Source.PAYMENT)


def completed(order_id: str, *lines: tuple[str, int]) -> Envelope:
    items = [StockLine(sku=sku, quantity=quantity) for sku, quantity in lines]
    event = OrderCompleted(customer_id="cust-1", total=Decimal("19.98"), currency="EUR", items=items)
    return caused(event, order_id, Source.SHIPPING)


def reserved(cluster: Cluster, order_id: str, *lines: tuple[str, int]) -> Envelope:
    """Given an order whose stock is reserved; returns its OrderPlaced."""
    order = placed(order_id, *lines)
    cluster.deliver(order)
    assert cluster.settle().types == ["InventoryReserved"]
    return order


def stock(cluster: Cluster, sku: str) -> tuple[int, int, int]:
    level = cluster.levels()[sku]
    return level.available, level.reserved, level.shipped


# --- reservation ------------------------------------------------------------------------------------------


def test_an_order_in_stock_is_reserved_line_by_line_then_announced_once_every_sku_held() -> None:
    cluster = Cluster()
    order = placed("o-1", ("WIDGET-1", 2), ("GADGET-1", 3), ("WIDGET-1", 1))

    step = cluster.deliver(order)

    # one hold per SKU (lines of one SKU summed), keyed by SKU, and nothing public yet
    assert step.events == []
    assert step.dead == []
    assert sorted((m.topic, m.key, m.body) for m in step.internal) == [
        (STOCK_REQUESTS.name, b"GADGET-1", StockRequest(operation="hold", sku="GADGET-1", order_id="o-1", quantity=3)),
        (STOCK_REQUESTS.name, b"WIDGET-1", StockRequest(operation="hold", sku="WIDGET-1", order_id="o-1", quantity=3)),
    ]
    state = cluster.order("o-1")
    assert state is not None
    assert state.status is OrderStatus.RESERVING
    assert state.awaiting == {"GADGET-1": 3, "WIDGET-1": 3}

    outcome = cluster.settle()

    [announcement] = outcome.events
    assert (announcement.topic, announcement.key) == (EVENTS, b"o-1")
    envelope = announcement.envelope
    assert isinstance(envelope.data, InventoryReserved)
    assert envelope.data.order.items == order.data.items  # type: ignore[attr-defined]
    assert envelope.data.order.customer_id == "cust-1"
    assert envelope.causation_id == order.event_id
    assert (
        envelope.event_id == Envelope.new(envelope.data, order_id="o-1", source=Source.INVENTORY, cause=order).event_id
    )
    assert envelope.source is Source.INVENTORY
    assert sorted(m.topic for m in outcome.internal) == [STOCK_REPLIES.name] * 2
    state = cluster.order("o-1")
    assert state is not None
    assert state.status is OrderStatus.RESERVED
    assert state.held == {"GADGET-1": 3, "WIDGET-1": 3}
    assert state.awaiting == {}
    assert stock(cluster, "WIDGET-1") == (997, 3, 0)
    assert stock(cluster, "GADGET-1") == (7, 3, 0)
    assert cluster.stored_skus()["GADGET-1"].holds == {"o-1": 3}


def test_a_multi_sku_order_with_one_short_sku_is_rejected_and_nothing_stays_held() -> None:
    cluster = Cluster()
    order = placed("o-1", ("WIDGET-1", 2), ("LIMITED-1", 6), ("GADGET-1", 1))
    cluster.deliver(order)

    outcome = cluster.settle()

    assert outcome.types == ["InventoryRejected", "OrderCancelled"]
    rejected, cancelled = (p.envelope for p in outcome.events)
    assert isinstance(rejected.data, InventoryRejected)
    assert rejected.data.shortages == [Shortage(sku="LIMITED-1", requested=6, available=5)]
    assert "LIMITED-1 (requested 6, available 5)" in rejected.data.reason
    assert isinstance(cancelled.data, OrderCancelled)
    assert cancelled.data.reason.startswith("inventory rejected: insufficient stock: LIMITED-1")
    assert {rejected.causation_id, cancelled.causation_id} == {order.event_id}
    releases = [m.body for m in outcome.internal if m.topic == STOCK_REQUESTS.name]
    assert sorted((r.operation, r.sku) for r in releases if isinstance(r, StockRequest)) == [
        ("release", "GADGET-1"),
        ("release", "WIDGET-1"),
    ]
    for sku in ("WIDGET-1", "GADGET-1", "LIMITED-1"):
        assert stock(cluster, sku) == (CATALOG[sku], 0, 0)
        assert cluster.levels()[sku].holds == {}
    state = cluster.order("o-1")
    assert state is not None
    assert state.status is OrderStatus.REJECTED


def test_an_unknown_sku_has_no_stock() -> None:
    cluster = Cluster()
    cluster.deliver(placed("o-1", ("NO-SUCH-SKU", 1)))

    outcome = cluster.settle()

    assert outcome.types == ["InventoryRejected", "OrderCancelled"]
    rejected = outcome.events[0].envelope.data
    assert isinstance(rejected, InventoryRejected)
    assert rejected.shortages == [Shortage(sku="NO-SUCH-SKU", requested=1, available=0)]
    assert "NO-SUCH-SKU" not in cluster.stored_skus()  # an unknown SKU leaves no state behind


def test_two_orders_competing_for_scarce_stock_never_oversell_it() -> None:
    cluster = Cluster()
    cluster.deliver(placed("o-1", ("LIMITED-1", 3)))
    cluster.deliver(placed("o-2", ("LIMITED-1", 3)))

    outcome = cluster.settle()

    by_order = {p.envelope.order_id: p.envelope.type for p in outcome.events if p.envelope.type != "OrderCancelled"}
    assert sorted(by_order.values()) == ["InventoryRejected", "InventoryReserved"]
    assert stock(cluster, "LIMITED-1") == (2, 3, 0)


# --- completion -------------------------------------------------------------------------------------------


def test_a_completed_order_moves_its_stock_from_reserved_to_shipped_once() -> None:
    cluster = Cluster()
    reserved(cluster, "o-1", ("WIDGET-1", 2), ("GADGET-1", 1))
    done = completed("o-1", ("WIDGET-1", 2), ("GADGET-1", 1))

    step = cluster.deliver(done)

    assert step.events == []
    assert sorted((m.body.operation, m.key) for m in step.internal if isinstance(m.body, StockRequest)) == [
        ("commit", b"GADGET-1"),
        ("commit", b"WIDGET-1"),
    ]
    assert cluster.settle().empty
    assert stock(cluster, "WIDGET-1") == (998, 0, 2)
    assert stock(cluster, "GADGET-1") == (9, 0, 1)
    state = cluster.order("o-1")
    assert state is not None
    assert state.status is OrderStatus.SHIPPED

    assert cluster.deliver(done).empty  # redelivered: no second commit
    assert cluster.deliver(completed("o-1", ("WIDGET-1", 2))).empty  # another completion: already shipped
    assert cluster.deliver(refunded("o-1")).empty  # nothing to compensate once shipped
    assert stock(cluster, "WIDGET-1") == (998, 0, 2)


# --- compensation ------------------------------------------------------------------------------------------

COMPENSATIONS = [
    pytest.param(declined, "payment declined: credit limit exceeded", id="declined"),
    pytest.param(refunded, "payment refunded: shipping failed", id="refunded"),
    pytest.param(voided, "cancelled: customer request", id="voided"),
]


@pytest.mark.parametrize(("trigger", "reason"), COMPENSATIONS)
def test_a_payment_compensation_after_the_reservation_releases_the_stock_and_cancels_the_order(
    trigger: Callable[[str], Envelope], reason: str
) -> None:
    cluster = Cluster()
    reserved(cluster, "o-1", ("WIDGET-1", 2), ("GADGET-1", 4))
    compensation = trigger("o-1")

    step = cluster.deliver(compensation)

    assert step.types == ["InventoryReleased", "OrderCancelled"]
    released, cancelled = (p.envelope for p in step.events)
    assert released.data == InventoryReleased(
        items=[StockLine(sku="GADGET-1", quantity=4), StockLine(sku="WIDGET-1", quantity=2)], reason=reason
    )
    assert cancelled.data == OrderCancelled(reason=reason)
    assert {released.causation_id, cancelled.causation_id} == {compensation.event_id}
    assert all(p.topic == EVENTS and p.key == b"o-1" for p in step.events)
    assert sorted(m.key for m in step.internal) == [b"GADGET-1", b"WIDGET-1"]
    cluster.settle()
    assert stock(cluster, "WIDGET-1") == (1000, 0, 0)
    assert stock(cluster, "GADGET-1") == (10, 0, 0)
    state = cluster.order("o-1")
    assert state is not None
    assert state.status is OrderStatus.RELEASED


def test_a_void_before_the_order_is_seen_cancels_at_once_and_the_late_order_is_ignored() -> None:
    cluster = Cluster()
    void = voided("o-1")

    step = cluster.deliver(void)

    assert step.types == ["OrderCancelled"]
    assert step.events[0].envelope.data == OrderCancelled(reason="cancelled: customer request")
    assert step.events[0].envelope.causation_id == void.event_id
    assert step.internal == []

    late = cluster.deliver(placed("o-1", ("LIMITED-1", 1)))

    assert late.empty
    assert cluster.settle().empty
    assert stock(cluster, "LIMITED-1") == (5, 0, 0)
    state = cluster.order("o-1")
    assert state is not None
    assert state.status is OrderStatus.CANCELLED


def test_a_void_while_holds_are_in_flight_cancels_at_once_and_returns_the_holds_quietly() -> None:
    cluster = Cluster()
    cluster.deliver(placed("o-1", ("WIDGET-1", 2), ("LIMITED-1", 9)))  # LIMITED-1 will be short
    void = voided("o-1")

    step = cluster.deliver(void)

    # The reservation was never announced, so nothing public is released: the order just ends.
    assert step.types == ["OrderCancelled"]
    assert step.events[0].envelope.causation_id == void.event_id
    state = cluster.order("o-1")
    assert state is not None
    assert state.status is OrderStatus.RESERVING
    assert state.cancellation is not None

    outcome = cluster.settle()

    assert outcome.types == []
    assert stock(cluster, "WIDGET-1") == (1000, 0, 0)
    state = cluster.order("o-1")
    assert state is not None
    assert state.status is OrderStatus.CANCELLED


def test_a_void_while_holds_are_in_flight_that_all_fail_only_cancels() -> None:
    cluster = Cluster()
    cluster.deliver(placed("o-1", ("EMPTY-1", 1)))
    assert cluster.deliver(voided("o-1")).types == ["OrderCancelled"]

    outcome = cluster.settle()

    assert outcome.types == []
    state = cluster.order("o-1")
    assert state is not None
    assert state.status is OrderStatus.CANCELLED


def test_a_compensation_after_the_order_is_closed_changes_nothing() -> None:
    cluster = Cluster()
    cluster.deliver(placed("o-1", ("LIMITED-1", 6)))
    assert cluster.settle().types == ["InventoryRejected", "OrderCancelled"]

    assert cluster.deliver(voided("o-1")).empty
    assert cluster.deliver(declined("o-1")).empty

    reserved(cluster, "o-2", ("WIDGET-1", 1))
    assert cluster.deliver(refunded("o-2")).types == ["InventoryReleased", "OrderCancelled"]
    assert cluster.deliver(voided("o-2")).empty  # a second, different compensation
    cluster.settle()
    assert stock(cluster, "WIDGET-1") == (1000, 0, 0)


def test_events_inventory_does_not_act_on_are_read_and_ignored() -> None:
    cluster = Cluster()
    reserved(cluster, "o-1", ("WIDGET-1", 1))
    before = cluster.order("o-1")
    details = before.order if before is not None else None
    assert details is not None
    ignored = [
        Envelope.new(OrderCancellationRequested(reason="changed my mind"), order_id="o-1", source=Source.CLIENT),
        caused(PaymentCharged(order=details, amount=Decimal("9.99"), currency="EUR"), "o-1", Source.PAYMENT),
        caused(ShipmentScheduled(shipment_id="s-1", carrier="dhl", ship_to="DE"), "o-1", Source.SHIPPING),
    ]

    for envelope in ignored:
        assert cluster.deliver(envelope).empty

    assert cluster.order("o-1") == before
    assert stock(cluster, "WIDGET-1") == (999, 1, 0)


# --- duplicates ---------------------------------------------------------------------------------------------


def test_a_duplicate_order_during_the_reservation_holds_nothing_twice_and_emits_nothing_yet() -> None:
    cluster = Cluster()
    order = placed("o-1", ("GADGET-1", 4))
    cluster.deliver(order)

    assert cluster.deliver(order).empty

    assert cluster.settle().types == ["InventoryReserved"]
    assert stock(cluster, "GADGET-1") == (6, 4, 0)


def test_a_duplicate_order_after_the_replies_re_emits_the_reservation_it_eventually_caused() -> None:
    cluster = Cluster()
    order = placed("o-1", ("GADGET-1", 4))
    cluster.deliver(order)
    [first] = cluster.settle().events

    again = cluster.deliver(order)

    assert [p.envelope for p in again.events] == [first.envelope]  # same id, same bytes
    assert again.internal == []
    assert stock(cluster, "GADGET-1") == (6, 4, 0)


def test_a_duplicate_rejected_order_re_emits_the_rejection_and_the_cancellation() -> None:
    cluster = Cluster()
    order = placed("o-1", ("LIMITED-1", 6))
    cluster.deliver(order)
    first = [p.envelope for p in cluster.settle().events]

    assert [p.envelope for p in cluster.deliver(order).events] == first


def test_a_duplicate_void_that_arrived_during_the_reservation_re_emits_the_cancellation() -> None:
    cluster = Cluster()
    cluster.deliver(placed("o-1", ("WIDGET-1", 3)))
    void = voided("o-1")
    first = [p.envelope for p in cluster.deliver(void).events]
    assert [e.type for e in first] == ["OrderCancelled"]
    assert cluster.settle().types == []

    again = cluster.deliver(void)

    assert [p.envelope for p in again.events] == first
    assert again.internal == []
    assert stock(cluster, "WIDGET-1") == (1000, 0, 0)


@pytest.mark.parametrize(("trigger", "reason"), COMPENSATIONS)
def test_a_duplicate_compensation_re_emits_the_same_events_and_releases_nothing_twice(
    trigger: Callable[[str], Envelope], reason: str
) -> None:
    cluster = Cluster()
    reserved(cluster, "o-1", ("WIDGET-1", 3))
    reserved(cluster, "o-2", ("WIDGET-1", 5))
    compensation = trigger("o-1")
    first = cluster.deliver(compensation)
    cluster.settle()

    again = cluster.deliver(compensation)

    assert [p.envelope for p in again.events] == [p.envelope for p in first.events]
    assert again.internal == []
    assert cluster.settle().empty
    assert stock(cluster, "WIDGET-1") == (995, 5, 0)  # o-2's hold untouched


# --- the SKU stage -----------------------------------------------------------------------------------------


def request(operation: str, order_id: str, sku: str = "LIMITED-1", quantity: int | None = None) -> bytes:
    return StockRequest(operation=operation, sku=sku, order_id=order_id, quantity=quantity).model_dump_json().encode()


def test_the_sku_stage_holds_releases_and_commits_idempotently_per_order() -> None:
    cluster = Cluster()

    def ask(operation: str, order_id: str, quantity: int | None = None) -> list[StockReply]:
        step = cluster.feed(STOCK_REQUESTS, request(operation, order_id, quantity=quantity), b"LIMITED-1")
        assert step.dead == []
        assert step.events == []
        return [m.body for m in step.internal if isinstance(m.body, StockReply)]

    assert ask("hold", "o-1", 3) == [StockReply(order_id="o-1", sku="LIMITED-1", requested=3, held=True, available=2)]
    assert ask("hold", "o-1", 3) == [StockReply(order_id="o-1", sku="LIMITED-1", requested=3, held=True, available=2)]
    assert ask("hold", "o-2", 3) == [StockReply(order_id="o-2", sku="LIMITED-1", requested=3, held=False, available=2)]
    assert ask("hold", "o-2", 2) == [StockReply(order_id="o-2", sku="LIMITED-1", requested=2, held=True, available=0)]
    assert stock(cluster, "LIMITED-1") == (0, 5, 0)

    assert ask("release", "o-9") == []  # unknown hold: a no-op
    assert ask("commit", "o-1") == []
    assert ask("commit", "o-1") == []  # repeated commit: nothing more ships
    assert ask("release", "o-1") == []  # release after commit: nothing to return
    assert ask("release", "o-2") == []
    assert ask("release", "o-2") == []
    assert stock(cluster, "LIMITED-1") == (2, 0, 3)
    assert cluster.levels()["LIMITED-1"].holds == {}


def test_sku_stock_refuses_any_state_that_breaks_conservation() -> None:
    stock_ = SkuStock.fresh("A-1", 5)
    stored = msgspec.structs.asdict(stock_)
    # Read back from the changelog
    with pytest.raises(ValueError, match="initial"):
        msgspec.json.decode(msgspec.json.encode({**stored, "available": 4}), type=SkuStock)
    with pytest.raises(ValueError, match="holds"):
        msgspec.json.decode(msgspec.json.encode({**stored, "available": 3, "reserved": 2}), type=SkuStock)
    with pytest.raises(ValueError, match=">= 0"):
        msgspec.json.decode(msgspec.json.encode({**stored, "available": 6, "shipped": -1}), type=SkuStock)
    # Built
    with pytest.raises(ValueError, match="initial"):
        SkuStock(sku="A-1", initial=5, available=4)
    # And changed
    held, granted = stock_.hold("o-1", 2)
    assert granted
    with pytest.raises(ValueError, match="holds"):
        held._with(reserved=3, available=2)
    with pytest.raises(ValueError, match="negative"):
        held._with(available=-1, reserved=4, holds={"o-1": 4})
    with pytest.raises(ValueError, match="initial"):
        held._with(available=4)


def test_a_hold_the_order_does_not_account_for_is_given_back() -> None:
    cluster = Cluster()
    reserved(cluster, "o-1", ("WIDGET-1", 1))
    stray = StockReply(order_id="o-1", sku="GADGET-1", requested=2, held=True, available=8)

    step = cluster.feed(STOCK_REPLIES, stray.model_dump_json().encode(), b"o-1")

    assert step.events == []
    assert [m.body for m in step.internal] == [
        StockRequest(operation=StockOperation.RELEASE, sku="GADGET-1", order_id="o-1")
    ]
    duplicate = StockReply(order_id="o-1", sku="WIDGET-1", requested=1, held=True, available=999)
    assert cluster.feed(STOCK_REPLIES, duplicate.model_dump_json().encode(), b"o-1").empty


# --- poison --------------------------------------------------------------------------------------------------


def _only_dead(step: Step, reason: str) -> None:
    assert step.events == []
    assert step.internal == []
    [dead] = step.dead
    assert reason in dead.reason
    assert dead.consumer == "inventory"


def test_poison_saga_records_are_dead_lettered_with_the_reason_and_change_nothing() -> None:
    cluster = Cluster(partitions=1)
    good = placed("o-1", ("WIDGET-1", 1))
    wrong_topic = Envelope.new(InventoryReserved(order=good.data), order_id="o-1", source=Source.INVENTORY)

    _only_dead(cluster.feed(ORDERS, b"{not json", b"o-1"), "not JSON")
    _only_dead(cluster.feed(ORDERS, good.to_bytes(), b"o-2"), "key")
    _only_dead(cluster.feed(ORDERS, wrong_topic.to_bytes(), b"o-1"), "not carried on topic orders")
    broken = json.loads(good.to_bytes())
    broken["data"]["items"][0]["quantity"] = 0
    _only_dead(cluster.feed(ORDERS, json.dumps(broken).encode(), b"o-1"), "data.items.0.quantity")
    _only_dead(cluster.feed(PAYMENT_EVENTS, None, b"o-1"), "null value")

    assert cluster.order("o-1") is None
    assert cluster.stores[0].keys() == []


def test_a_services_record_on_the_wrong_partition_is_dead_lettered() -> None:
    # (A client's is forwarded to its key's partition instead: see tests/test_client_routing.py.)
    cluster = Cluster(partitions=6)
    wrong = (partition_for(b"o-1", 6) + 1) % 6

    _only_dead(cluster.feed(SHIPPING_EVENTS, completed("o-1").to_bytes(), b"o-1", partition=wrong), "partition")


def test_poison_internal_messages_are_dead_lettered_with_the_reason() -> None:
    cluster = Cluster(partitions=6)
    reply = StockReply(order_id="o-1", sku="A-1", requested=1, held=True, available=0).model_dump_json().encode()
    right = partition_for(b"LIMITED-1", 6)

    _only_dead(cluster.feed(STOCK_REQUESTS, b'{"operation": "hold"', b"LIMITED-1"), "Invalid JSON")
    hold_without_quantity = b'{"operation": "hold", "sku": "LIMITED-1", "order_id": "o-1"}'
    _only_dead(cluster.feed(STOCK_REQUESTS, hold_without_quantity, b"LIMITED-1"), "quantity: required for a hold")
    steal = b'{"operation": "steal", "sku": "LIMITED-1", "order_id": "o-1"}'
    _only_dead(cluster.feed(STOCK_REQUESTS, steal, b"LIMITED-1"), "operation")
    _only_dead(cluster.feed(STOCK_REQUESTS, request("hold", "o-1", quantity=1), b"WIDGET-1"), "key")
    _only_dead(
        cluster.feed(STOCK_REQUESTS, request("hold", "o-1", quantity=1), b"LIMITED-1", partition=(right + 1) % 6),
        "partition",
    )
    _only_dead(cluster.feed(STOCK_REQUESTS, None, b"LIMITED-1"), "null value")
    _only_dead(cluster.feed(STOCK_REPLIES, reply, b"o-2"), "key")

    assert stock(cluster, "LIMITED-1") == (5, 0, 0)
    assert cluster.stored_skus() == {}


# --- the catalog and settings ----------------------------------------------------------------------------------


def test_the_default_catalog_is_valid_and_has_a_scarce_sku_for_demos() -> None:
    catalog = load_catalog(DEFAULT_CATALOG)

    assert len(catalog) >= 15
    assert catalog["WIDGET-1"] == 1000
    assert catalog["LIMITED-1"] == 5


def test_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CHOREO_INVENTORY_CATALOG", raising=False)
    monkeypatch.delenv("CHOREO_HEALTH_PORT", raising=False)
    assert InventorySettings().inventory_catalog == DEFAULT_CATALOG
    assert InventorySettings().health_port == 8101
    assert DEFAULT_CATALOG.is_file()

    custom = tmp_path / "stock.json"
    custom.write_text('{"X-1": 7}')
    monkeypatch.setenv("CHOREO_INVENTORY_CATALOG", str(custom))
    settings = InventorySettings()

    assert settings.inventory_catalog == custom
    assert build_app(settings).catalog == {"X-1": 7}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"WIDGET-1": -1}', 'entry "WIDGET-1": starting stock must be a non-negative integer, not -1'),
        ('{"WIDGET-1": 2.5}', 'entry "WIDGET-1": starting stock must be a non-negative integer, not 2.5'),
        ('{"WIDGET-1": "10"}', "not '10'"),
        ('{"WIDGET-1": true}', "not True"),
        ('{"WIDGET-1": 1, "bad sku": 3}', 'entry "bad sku": not a valid SKU'),
        ('{"": 3}', 'entry "": not a valid SKU'),
        ('{"WIDGET-1": 1, "WIDGET-1": 2}', 'entry "WIDGET-1" appears more than once'),
        ("[1, 2]", "must be a JSON object"),
        ("{oops", "not JSON"),
    ],
)
def test_an_invalid_catalog_is_refused_naming_the_bad_entry(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(content)

    with pytest.raises(CatalogError, match="catalog") as caught:
        build_app(InventorySettings(inventory_catalog=path))

    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_missing_catalog_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot be read"):
        load_catalog(tmp_path / "absent.json")


def test_the_app_reads_what_the_saga_needs_and_nothing_it_must_not() -> None:
    app = build_app(InventorySettings(inventory_catalog=DEFAULT_CATALOG))
    carried = {event for topic in app.inputs for event in topic.events}

    assert app.name == "inventory"
    assert {t.name for t in app.inputs} == {
        ORDERS.name,
        PAYMENT_EVENTS.name,
        SHIPPING_EVENTS.name,
        STOCK_REQUESTS.name,
        STOCK_REPLIES.name,
    }
    assert {OrderPlaced, PaymentDeclined, PaymentRefunded, PaymentVoided, OrderCompleted} <= carried
    assert app.changelog.name == "inventory.state"
    assert app.changelog.compacted

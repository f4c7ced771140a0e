"""Shipping, driven through its real StreamApp and TaskContext with in-memory stores (no broker)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.envelope import Envelope, Source
from schemas.events import (
    Address,
    ApprovalGranted,
    ApprovalRequested,
    Event,
    OrderCancellationRefused,
    OrderCancellationRequested,
    OrderCompleted,
    OrderDetails,
    OrderLine,
    OrderPlaced,
    ShipmentCancelled,
    ShipmentScheduled,
    ShippingFailed,
    StockLine,
)
from schemas.topics import APPROVAL_EVENTS, DEAD_LETTER, ORDERS, SHIPPING_EVENTS, SHIPPING_STATE
from services.common.saga import order_key
from services.shipping.app import ShippingApp, build_app
from services.shipping.domain import ShippingOrderState, ShippingStatus, shipment_id_for
from services.shipping.settings import DEFAULT_SHIPPING_COUNTRIES, EU_MEMBERS, ShippingSettings
from tests.app_harness import AppHarness, Out

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


# --- harness ----------------------------------------------------------------------------------


class Harness(AppHarness[ShippingApp, ShippingSettings]):
    """The shipping app over every task, without a broker."""

    def __init__(self, settings: ShippingSettings | None = None) -> None:
        super().__init__(settings or ShippingSettings(_env_file=None), build_app)

    def state(self, order_id: str) -> ShippingOrderState | None:
        return self.stores[self.partition(order_id)].get(order_key(order_id), ShippingOrderState)


def order(country: str = "FR", lines: tuple[tuple[str, int, str], ...] = (("sku-a", 2, "10.00"),)) -> OrderDetails:
    return OrderDetails(
        customer_id="cust-1",
        items=[OrderLine(sku=sku, quantity=quantity, unit_price=Decimal(price)) for sku, quantity, price in lines],
        currency="EUR",
        ship_to=Address(country=country, city="Somewhere"),
    )


def granted(order_id: str, details: OrderDetails | None = None) -> Envelope:
    event = ApprovalGranted(order=details or order(), reviewer="system", reason="below threshold")
    return Envelope.new(event, order_id=order_id, source=Source.APPROVAL, occurred_at=NOW)


def cancel(order_id: str, reason: str = "changed my mind") -> Envelope:
    return Envelope.new(OrderCancellationRequested(reason=reason), order_id=order_id, source=Source.CLIENT)


def events(outs: list[Out]) -> list[Event]:
    return [out.envelope.data for out in outs if out.envelope is not None]


# --- settings ---------------------------------------------------------------------------------


def test_default_destinations_are_the_eu_and_the_listed_countries_but_not_antarctica() -> None:
    settings = ShippingSettings(_env_file=None)
    assert len(EU_MEMBERS) == 27
    assert settings.shipping_countries == DEFAULT_SHIPPING_COUNTRIES
    assert {"GB", "NO", "CH", "US", "CA", "AU", "NZ", "JP", "DE", "FR"} <= settings.shipping_countries
    assert "AQ" not in settings.shipping_countries
    assert len(settings.shipping_countries) == 35
    assert settings.shipping_carrier == "choreo-post"
    assert settings.health_port == 8103


@pytest.mark.parametrize("raw", ["fr, DE,US", '["FR", "de", "US"]'])
def test_destinations_from_env_as_a_comma_list_or_json(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("CHOREO_SHIPPING_COUNTRIES", raw)
    assert ShippingSettings(_env_file=None).shipping_countries == frozenset({"FR", "DE", "US"})


@pytest.mark.parametrize("raw", ["FR,XX", '["ZZ"]', ""])
def test_unknown_or_missing_destinations_are_refused(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("CHOREO_SHIPPING_COUNTRIES", raw)
    with pytest.raises(ValidationError):
        ShippingSettings(_env_file=None)


def test_app_reads_approvals_and_orders_and_keeps_its_own_changelog() -> None:
    app = build_app(ShippingSettings(_env_file=None))
    assert app.name == "shipping"
    assert tuple(app.inputs) == (APPROVAL_EVENTS, ORDERS)
    assert app.changelog is SHIPPING_STATE


# --- approval granted -------------------------------------------------------------------------


def test_granted_order_to_a_served_country_is_scheduled_and_completed_in_one_reaction() -> None:
    h = Harness()
    details = order("DE", (("sku-a", 2, "10.00"), ("sku-b", 1, "5.50"), ("sku-a", 3, "10.00")))
    grant = granted("o-1", details)

    outs = h.feed(APPROVAL_EVENTS, grant)

    assert {out.topic for out in outs} == {SHIPPING_EVENTS.name}
    assert {out.key for out in outs} == {"o-1"}
    assert events(outs) == [
        ShipmentScheduled(shipment_id=shipment_id_for("o-1"), carrier="choreo-post", ship_to="DE"),
        OrderCompleted(
            customer_id="cust-1",
            total=Decimal("55.50"),
            currency="EUR",
            items=[StockLine(sku="sku-a", quantity=5), StockLine(sku="sku-b", quantity=1)],
        ),
    ]
    for out in outs:
        assert out.envelope is not None
        assert out.envelope.causation_id == grant.event_id
        assert out.envelope.source is Source.SHIPPING
    state = h.state("o-1")
    assert state is not None
    assert state.status is ShippingStatus.COMPLETED
    assert state.shipment_id == shipment_id_for("o-1")
    assert state.ship_to == "DE"


def test_shipment_id_is_derived_from_the_order() -> None:
    assert shipment_id_for("o-1") == shipment_id_for("o-1")
    assert shipment_id_for("o-1") != shipment_id_for("o-2")


def test_carrier_comes_from_settings() -> None:
    h = Harness(ShippingSettings(_env_file=None, shipping_carrier="fast-freight"))
    [scheduled, _] = events(h.feed(APPROVAL_EVENTS, granted("o-1")))
    assert isinstance(scheduled, ShipmentScheduled)
    assert scheduled.carrier == "fast-freight"


def test_shipping_to_antarctica_fails_naming_the_country() -> None:
    h = Harness()
    outs = h.feed(APPROVAL_EVENTS, granted("o-1", order("AQ")))

    [failed] = events(outs)
    assert isinstance(failed, ShippingFailed)
    assert "AQ" in failed.reason
    assert outs[0].topic == SHIPPING_EVENTS.name
    state = h.state("o-1")
    assert state is not None
    assert state.status is ShippingStatus.FAILED


def test_destination_outside_a_configured_list_fails() -> None:
    h = Harness(ShippingSettings(_env_file=None, shipping_countries=frozenset({"FR"})))
    [failed] = events(h.feed(APPROVAL_EVENTS, granted("o-1", order("DE"))))
    assert isinstance(failed, ShippingFailed)
    assert "DE" in failed.reason


def test_other_approval_events_and_order_placed_are_ignored_without_state() -> None:
    h = Harness()
    details = order()
    requested = ApprovalRequested(order=details, amount=details.total, currency="EUR", deadline=NOW)
    placed = OrderPlaced(**details.model_dump())
    assert h.feed(APPROVAL_EVENTS, Envelope.new(requested, order_id="o-1", source=Source.APPROVAL)) == []
    assert h.feed(ORDERS, Envelope.new(placed, order_id="o-1", source=Source.CLIENT)) == []
    assert h.state("o-1") is None


def test_redelivered_grant_re_emits_the_same_events_and_ships_once() -> None:
    h = Harness()
    grant = granted("o-1")
    first = h.feed(APPROVAL_EVENTS, grant)
    state = h.state("o-1")

    again = h.feed(APPROVAL_EVENTS, grant)

    assert again == first
    assert h.state("o-1") == state


def test_a_second_grant_after_completion_changes_nothing() -> None:
    h = Harness()
    h.feed(APPROVAL_EVENTS, granted("o-1"))
    assert h.feed(APPROVAL_EVENTS, granted("o-1")) == []


# --- cancellation -----------------------------------------------------------------------------


def test_cancellation_before_the_grant_cancels_and_a_late_grant_never_ships() -> None:
    h = Harness()
    request = cancel("o-1", "found it cheaper")

    outs = h.feed(ORDERS, request)

    assert events(outs) == [ShipmentCancelled(had_shipment=False, reason="found it cheaper")]
    assert outs[0].topic == SHIPPING_EVENTS.name
    assert outs[0].envelope is not None
    assert outs[0].envelope.causation_id == request.event_id
    state = h.state("o-1")
    assert state is not None
    assert state.status is ShippingStatus.CANCELLED

    assert h.feed(APPROVAL_EVENTS, granted("o-1")) == []
    state = h.state("o-1")
    assert state is not None
    assert state.status is ShippingStatus.CANCELLED
    assert state.shipment_id is None


def test_cancellation_after_completion_is_refused() -> None:
    h = Harness()
    h.feed(APPROVAL_EVENTS, granted("o-1"))

    outs = h.feed(ORDERS, cancel("o-1"))

    assert events(outs) == [OrderCancellationRefused(reason="order already completed")]
    state = h.state("o-1")
    assert state is not None
    assert state.status is ShippingStatus.COMPLETED


def test_cancellation_after_a_failed_shipment_emits_nothing() -> None:
    h = Harness()
    h.feed(APPROVAL_EVENTS, granted("o-1", order("AQ")))
    assert h.feed(ORDERS, cancel("o-1")) == []
    state = h.state("o-1")
    assert state is not None
    assert state.status is ShippingStatus.FAILED


def test_a_second_cancellation_emits_nothing_and_a_redelivered_one_repeats_its_answer() -> None:
    h = Harness()
    request = cancel("o-1")
    first = h.feed(ORDERS, request)
    assert h.feed(ORDERS, request) == first
    assert h.feed(ORDERS, cancel("o-1", "again")) == []


# --- poison -----------------------------------------------------------------------------------


def test_poison_messages_are_dead_lettered_with_the_reason() -> None:
    h = Harness()
    p = h.partition("o-1")
    wrong_partition = (p + 1) % h.settings.partitions
    good = granted("o-1")
    cases = [
        (APPROVAL_EVENTS, b"o-1", b"not json", p, "not JSON"),
        (APPROVAL_EVENTS, b"o-1", json.dumps({"type": "Nope"}).encode(), p, "unknown event type"),
        (APPROVAL_EVENTS, b"o-1", cancel("o-1").to_bytes(), p, "not carried on topic"),
        (APPROVAL_EVENTS, b"o-2", good.to_bytes(), p, "key"),
        (APPROVAL_EVENTS, b"o-1", good.to_bytes(), wrong_partition, "partition"),
    ]
    for topic, key, value, partition, reason in cases:
        [out] = h.feed_raw(topic, key, value, partition)
        assert out.topic == DEAD_LETTER.name
        assert out.dead_letter is not None
        assert reason in out.dead_letter.reason
        assert out.dead_letter.consumer == "shipping"
    assert h.state("o-1") is None


# --- properties -------------------------------------------------------------------------------

TRIGGERS = ("grant", "cancel", "cancel-again", "placed", "requested")


@settings(max_examples=300, deadline=None)
@given(
    arrivals=st.lists(st.sampled_from(TRIGGERS), min_size=1, max_size=10),
    served=st.booleans(),
)
def test_every_arrival_order_ends_in_exactly_one_outcome_and_never_ships_after_a_cancellation(
    arrivals: list[str], served: bool
) -> None:
    h = Harness()
    details = order("FR" if served else "AQ")
    envelopes = {
        "grant": granted("o-1", details),
        "cancel": cancel("o-1", "first"),
        "cancel-again": cancel("o-1", "second"),
        "placed": Envelope.new(OrderPlaced(**details.model_dump()), order_id="o-1", source=Source.CLIENT),
        "requested": Envelope.new(
            ApprovalRequested(order=details, amount=details.total, currency="EUR", deadline=NOW),
            order_id="o-1",
            source=Source.APPROVAL,
        ),
    }
    topics = {"grant": APPROVAL_EVENTS, "requested": APPROVAL_EVENTS}

    seen: dict[str, Event] = {}  # distinct event ids, in first-emission order
    cancelled_first = False
    for name in arrivals:
        if name.startswith("cancel") and "grant" not in arrivals[: arrivals.index(name)]:
            cancelled_first = True
        for out in h.feed(topics.get(name, ORDERS), envelopes[name]):
            assert out.envelope is not None
            seen.setdefault(str(out.envelope.event_id), out.envelope.data)

    kinds = [type(event) for event in seen.values()]
    outcomes = [kind for kind in kinds if kind in (OrderCompleted, ShippingFailed, ShipmentCancelled)]
    assert len(outcomes) <= 1
    assert kinds.count(ShipmentScheduled) == kinds.count(OrderCompleted) <= 1
    if cancelled_first:
        assert outcomes == [ShipmentCancelled]
    if OrderCancellationRefused in kinds:
        assert outcomes == [OrderCompleted]
    if ShipmentCancelled in kinds:
        assert ShipmentScheduled not in kinds
    if "grant" in arrivals or any(name.startswith("cancel") for name in arrivals):
        state = h.state("o-1")
        assert state is not None
        assert state.status is not ShippingStatus.OPEN
        expected = {OrderCompleted: ShippingStatus.COMPLETED, ShippingFailed: ShippingStatus.FAILED}
        assert state.status is expected.get(outcomes[0], ShippingStatus.CANCELLED)
        if served and not cancelled_first:
            assert outcomes == [OrderCompleted]
    else:
        assert seen == {}

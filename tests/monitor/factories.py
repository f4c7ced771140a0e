"""Envelopes of one order's saga as the audit topic carries them, for the monitor's tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from schemas.envelope import Envelope, Source
from schemas.events import (
    Address,
    InventoryReserved,
    OrderCancelled,
    OrderCompleted,
    OrderDetails,
    OrderLine,
    OrderPlaced,
    PaymentCharged,
    StockLine,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def details(customer: str = "C-1") -> OrderDetails:
    return OrderDetails(
        customer_id=customer,
        items=[OrderLine(sku="SKU-1", quantity=1, unit_price=Decimal("10.00"))],
        currency="EUR",
        ship_to=Address(country="DE"),
    )


def placed(order_id: str, at: datetime = T0, customer: str = "C-1") -> Envelope:
    order = details(customer)
    event = OrderPlaced(
        customer_id=order.customer_id, items=order.items, currency=order.currency, ship_to=order.ship_to
    )
    return Envelope.new(event, order_id=order_id, source=Source.CLIENT, occurred_at=at)


def reserved(cause: Envelope, at: datetime | None = None) -> Envelope:
    return Envelope.new(
        InventoryReserved(order=details()),
        order_id=cause.order_id,
        source=Source.INVENTORY,
        cause=cause,
        occurred_at=at or cause.occurred_at + timedelta(seconds=1),
    )


def charged(cause: Envelope, at: datetime | None = None) -> Envelope:
    return Envelope.new(
        PaymentCharged(order=details(), amount=Decimal("10.00"), currency="EUR"),
        order_id=cause.order_id,
        source=Source.PAYMENT,
        cause=cause,
        occurred_at=at or cause.occurred_at + timedelta(seconds=1),
    )


def completed(cause: Envelope, at: datetime | None = None) -> Envelope:
    return Envelope.new(
        OrderCompleted(
            customer_id="C-1", total=Decimal("10.00"), currency="EUR", items=[StockLine(sku="SKU-1", quantity=1)]
        ),
        order_id=cause.order_id,
        source=Source.SHIPPING,
        cause=cause,
        occurred_at=at or cause.occurred_at + timedelta(seconds=1),
    )


def cancelled(cause: Envelope, at: datetime | None = None) -> Envelope:
    return Envelope.new(
        OrderCancelled(reason="test"),
        order_id=cause.order_id,
        source=Source.INVENTORY,
        cause=cause,
        occurred_at=at or cause.occurred_at + timedelta(seconds=1),
    )


def saga(order_id: str, at: datetime = T0, *, finish: bool = True) -> list[Envelope]:
    """placed -> reserved -> charged (-> completed): a whole saga, or one left open."""
    first = placed(order_id, at)
    second = reserved(first)
    third = charged(second)
    return [first, second, third, completed(third)] if finish else [first, second, third]

"""Every outcome of the saga, end to end on the real broker: the audit timeline is exactly as expected."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from schemas.envelope import Envelope, Source
from schemas.events import Address, OrderCancellationRequested, OrderLine, OrderPlaced
from services.common.publisher import publish
from services.common.settings import ChoreoSettings
from tests.e2e.harness import SagaStack, audit_by_order, terminal_count, timeline, wait_for_events

HAPPY = ["OrderPlaced", "InventoryReserved", "PaymentCharged", "ApprovalGranted", "ShipmentScheduled", "OrderCompleted"]


def order(
    order_id: str, *, customer: str = "cust-e2e", sku: str = "WIDGET-1", quantity: int = 1, price: str = "10.00",
    country: str = "DE",
) -> Envelope:  # fmt: skip
    placed = OrderPlaced(
        customer_id=customer,
        items=[OrderLine.model_validate({"sku": sku, "quantity": quantity, "unit_price": price})],
        currency="EUR",
        ship_to=Address(country=country),
    )
    return Envelope.new(placed, order_id=order_id, source=Source.CLIENT)


def cancellation(order_id: str) -> Envelope:
    return Envelope.new(OrderCancellationRequested(reason="customer request"), order_id=order_id, source=Source.CLIENT)


@pytest.fixture
async def stack(choreo_settings: ChoreoSettings) -> AsyncIterator[SagaStack]:
    overrides: dict[str, dict[str, Any]] = {"approval": {"approval_timeout": 3600}}
    async with SagaStack(choreo_settings, overrides) as running:
        yield running


async def finished(settings: ChoreoSettings, order_id: str, *last: str) -> list[str]:
    seen = await wait_for_events(settings, order_id, *last)
    envelopes = (await audit_by_order(settings))[order_id]
    assert terminal_count(envelopes) <= 1
    assert len({e.event_id for e in envelopes}) == len(envelopes), "an event landed on audit twice"
    return seen


async def test_completed(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    await stack.start()
    await publish(choreo_settings, [order("o-ok")])
    assert await finished(choreo_settings, "o-ok", "OrderCompleted") == HAPPY


async def test_inventory_rejected(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    await stack.start()
    await publish(choreo_settings, [order("o-short", sku="NO-SUCH-SKU")])
    assert await finished(choreo_settings, "o-short", "OrderCancelled") == [
        "OrderPlaced", "InventoryRejected", "OrderCancelled",
    ]  # fmt: skip


async def test_payment_declined(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    await stack.start()
    await publish(choreo_settings, [order("o-broke", customer="no-credit")])
    assert await finished(choreo_settings, "o-broke", "OrderCancelled") == [
        "OrderPlaced", "InventoryReserved", "PaymentDeclined", "InventoryReleased", "OrderCancelled",
    ]  # fmt: skip


async def test_shipping_failed(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    await stack.start()
    await publish(choreo_settings, [order("o-antarctica", country="AQ")])
    assert await finished(choreo_settings, "o-antarctica", "OrderCancelled") == [
        "OrderPlaced", "InventoryReserved", "PaymentCharged", "ApprovalGranted", "ShippingFailed",
        "PaymentRefunded", "InventoryReleased", "OrderCancelled",
    ]  # fmt: skip


async def test_approval_pending_stays_pending(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    await stack.start()
    await publish(choreo_settings, [order("o-big", quantity=10, price="100.00")])
    await wait_for_events(choreo_settings, "o-big", "ApprovalRequested")
    await stack.settle()
    assert await timeline(choreo_settings, "o-big") == [
        "OrderPlaced", "InventoryReserved", "PaymentCharged", "ApprovalRequested",
    ]  # fmt: skip


async def test_cancellation_before_inventory(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    await stack.start("audit", "shipping", "approval", "payment")
    await publish(choreo_settings, [order("o-c1"), cancellation("o-c1")])
    await wait_for_events(choreo_settings, "o-c1", "PaymentVoided")
    await stack.start("inventory")
    assert await finished(choreo_settings, "o-c1", "OrderCancelled") == [
        "OrderPlaced", "OrderCancellationRequested", "ShipmentCancelled", "PaymentVoided", "OrderCancelled",
    ]  # fmt: skip
    await stack.settle()
    assert "InventoryReserved" not in await timeline(choreo_settings, "o-c1")


async def test_cancellation_before_payment(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    await stack.start("audit", "shipping", "approval", "inventory")
    await publish(choreo_settings, [order("o-c2")])
    await wait_for_events(choreo_settings, "o-c2", "InventoryReserved")
    await publish(choreo_settings, [cancellation("o-c2")])
    await wait_for_events(choreo_settings, "o-c2", "ShipmentCancelled")
    await stack.start("payment")
    assert await finished(choreo_settings, "o-c2", "OrderCancelled") == [
        "OrderPlaced", "InventoryReserved", "OrderCancellationRequested", "ShipmentCancelled", "PaymentVoided",
        "InventoryReleased", "OrderCancelled",
    ]  # fmt: skip
    await stack.settle()
    assert "PaymentCharged" not in await timeline(choreo_settings, "o-c2")


async def test_cancellation_while_approval_pending(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    await stack.start()
    await publish(choreo_settings, [order("o-c3", quantity=10, price="100.00")])
    await wait_for_events(choreo_settings, "o-c3", "ApprovalRequested")
    await publish(choreo_settings, [cancellation("o-c3")])
    assert await finished(choreo_settings, "o-c3", "OrderCancelled") == [
        "OrderPlaced", "InventoryReserved", "PaymentCharged", "ApprovalRequested", "OrderCancellationRequested",
        "ShipmentCancelled", "PaymentRefunded", "InventoryReleased", "OrderCancelled",
    ]  # fmt: skip


async def test_cancellation_before_shipping(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    # Shipping decides between a grant and a cancellation: the cancellation it sees first wins.
    await stack.start("audit", "approval", "payment", "inventory")
    await publish(choreo_settings, [order("o-c4", quantity=10, price="100.00")])
    await wait_for_events(choreo_settings, "o-c4", "ApprovalRequested")
    await publish(choreo_settings, [cancellation("o-c4")])
    await stack.start("shipping")
    assert await finished(choreo_settings, "o-c4", "OrderCancelled") == [
        "OrderPlaced", "InventoryReserved", "PaymentCharged", "ApprovalRequested", "OrderCancellationRequested",
        "ShipmentCancelled", "PaymentRefunded", "InventoryReleased", "OrderCancelled",
    ]  # fmt: skip
    await stack.settle()
    assert "ShipmentScheduled" not in await timeline(choreo_settings, "o-c4")


async def test_cancellation_after_completion_is_refused(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    await stack.start()
    await publish(choreo_settings, [order("o-c5")])
    await wait_for_events(choreo_settings, "o-c5", "OrderCompleted")
    await publish(choreo_settings, [cancellation("o-c5")])
    assert await finished(choreo_settings, "o-c5", "OrderCancellationRefused") == [
        *HAPPY, "OrderCancellationRequested", "OrderCancellationRefused",
    ]  # fmt: skip


async def test_a_duplicated_order_has_no_second_effect(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    await stack.start()
    placed = order("o-dup")
    await publish(choreo_settings, [placed, placed])
    await wait_for_events(choreo_settings, "o-dup", "OrderCompleted")
    await publish(choreo_settings, [placed])
    await stack.settle()
    assert await timeline(choreo_settings, "o-dup") == HAPPY

"""Every outcome of the saga, end to end on the real broker: the audit timeline is exactly as expected."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from schemas.deadletter import DeadLetter
from schemas.envelope import Envelope, Source
from schemas.events import Address, OrderCancellationRequested, OrderLine, OrderPlaced
from schemas.topics import DEAD_LETTER, ORDERS
from services.common.kafka import partition_for
from services.common.publisher import publish
from services.common.settings import ChoreoSettings
from tests.e2e.harness import SagaStack, audit_by_order, terminal_count, timeline, wait_for_events
from tests.support import choreo, eventually, read_topic

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

    audit = choreo(choreo_settings, "audit", "--order", "o-ok")
    assert audit.returncode == 0, audit.stderr
    assert [line.split()[2] for line in audit.stdout.splitlines()[1:-1]] == HAPPY
    assert audit.stdout.splitlines()[-1].strip() == "outcome: completed"
    status = choreo(choreo_settings, "status", "o-ok")
    assert status.returncode == 0, status.stderr
    assert "completed" in status.stdout.splitlines()[0]
    assert choreo(choreo_settings, "status", "o-unknown").returncode == 1


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
    # Inventory reads the order and the void in the order they happened: it reserves (its request and
    # reply stay in process) and then releases; only a void read first would leave nothing to release.
    cancelled = ["OrderPlaced", "OrderCancellationRequested", "ShipmentCancelled", "PaymentVoided"]
    assert await finished(choreo_settings, "o-c1", "OrderCancelled") in (
        [*cancelled, "InventoryReserved", "InventoryReleased", "OrderCancelled"],
        [*cancelled, "OrderCancelled"],
    )
    await stack.settle()
    assert "PaymentCharged" not in await timeline(choreo_settings, "o-c1")
    assert (await timeline(choreo_settings, "o-c1")).count("OrderCancelled") == 1


async def test_cancellation_before_payment(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    await stack.start("audit", "shipping", "approval", "inventory")
    await publish(choreo_settings, [order("o-c2")])
    await wait_for_events(choreo_settings, "o-c2", "InventoryReserved")
    await publish(choreo_settings, [cancellation("o-c2")])
    await wait_for_events(choreo_settings, "o-c2", "ShipmentCancelled")
    await stack.start("payment")
    # Payment reads the reservation before the cancellation: it charges (the ledger's hold stays in
    # process) and then refunds; only a cancellation read first would leave nothing to charge.
    cancelled = ["OrderPlaced", "InventoryReserved", "OrderCancellationRequested", "ShipmentCancelled"]
    assert await finished(choreo_settings, "o-c2", "OrderCancelled") in (
        [*cancelled, "PaymentCharged", "PaymentRefunded", "InventoryReleased", "OrderCancelled"],
        [*cancelled, "PaymentVoided", "InventoryReleased", "OrderCancelled"],
    )
    await stack.settle()
    assert await timeline(choreo_settings, "o-c2") in (
        [*cancelled, "PaymentCharged", "PaymentRefunded", "InventoryReleased", "OrderCancelled"],
        [*cancelled, "PaymentVoided", "InventoryReleased", "OrderCancelled"],
    )


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


async def test_poison_is_dead_lettered_and_the_partition_keeps_flowing(
    stack: SagaStack, choreo_settings: ChoreoSettings
) -> None:
    await stack.start()
    placed = order("o-after-poison")
    unknown_type = placed.model_dump(mode="json") | {"type": "OrderTeleported"}
    invalid = placed.model_dump(mode="json")
    invalid["data"]["items"][0]["quantity"] = 0
    poison = [b"not json at all", json.dumps(unknown_type).encode(), json.dumps(invalid).encode()]
    producer = AIOKafkaProducer(**choreo_settings.kafka_options())
    await producer.start()
    try:
        partition = partition_for(placed.key, choreo_settings.partitions)
        for value in poison:  # same key and partition as the good order that follows
            await producer.send_and_wait(choreo_settings.topic(ORDERS), value, key=placed.key, partition=partition)
    finally:
        await producer.stop()
    await publish(choreo_settings, [placed])

    # each rejected command is on the order's timeline, before the order that then completes
    rejected = ["OrderCommandRejected"] * len(poison)
    assert await finished(choreo_settings, "o-after-poison", "OrderCompleted") == rejected + HAPPY

    async def dead_letters() -> list[DeadLetter]:
        return [DeadLetter.model_validate_json(r.value) for r in await read_topic(choreo_settings, DEAD_LETTER)]

    # the topic's router (inventory) keeps each one, once; the other readers leave it to it
    letters = await eventually(dead_letters, lambda found: len(found) >= len(poison))
    await stack.settle()
    assert len(await dead_letters()) == len(poison)
    by_value = {base64.b64decode(letter.value_base64 or ""): letter for letter in letters}
    assert set(by_value) == set(poison)
    assert "not JSON" in by_value[poison[0]].reason
    assert "unknown event type 'OrderTeleported'" in by_value[poison[1]].reason
    assert "data.items.0.quantity" in by_value[poison[2]].reason
    assert {letter.consumer for letter in letters} == {"inventory"}

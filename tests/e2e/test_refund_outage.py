"""The refund provider is down while orders fail shipping: on the real broker, every refund is retried (visibly,
on audit) until the provider is back, then compensates exactly once, and the customer's money is conserved.

The outage is the payment setting `payment_refund_outages` (`CHOREO_PAYMENT_REFUND_OUTAGES`). It first
lasts an hour, so the test never races the clock: the refunds are seen failing on audit, whatever the
machine's speed. Then payment restarts with the outage ending a few seconds later, as an operator would
once the provider recovered; the retries pending in its state carry on from the changelog.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from schemas.envelope import Envelope, Source
from schemas.events import Address, OrderLine, OrderPlaced, PaymentRefunded, PaymentRefundFailed
from schemas.topics import DEAD_LETTER, PAYMENT_STATE
from services.common.publisher import publish
from services.common.settings import ChoreoSettings
from tests.e2e.harness import SagaStack, audit_by_order
from tests.support import eventually, read_topic

CUSTOMER = "cust-refund-outage"
PRICE = Decimal("12.50")
FAILING = [f"o-refund-outage-{n}" for n in range(3)]
SHIPPED = "o-refund-outage-ok"
ORDER_IDS = (*FAILING, SHIPPED)
RECOVERY_AFTER = timedelta(seconds=3)
COMPENSATED_ONCE = ("PaymentRefunded", "InventoryReleased", "OrderCancelled")


def order(order_id: str, country: str) -> Envelope:
    placed = OrderPlaced(
        customer_id=CUSTOMER,
        items=[OrderLine(sku="WIDGET-1", quantity=1, unit_price=PRICE)],
        currency="EUR",
        ship_to=Address(country=country),
    )
    return Envelope.new(placed, order_id=order_id, source=Source.CLIENT)


def outage(start: datetime, end: datetime) -> dict[str, Any]:
    """Payment's overrides: the refund provider down in [start, end), retries 0.2 s doubling up to 1 s."""
    return {
        "payment_refund_outages": [{"start": start.isoformat(), "end": end.isoformat()}],
        "payment_refund_retry_initial": 0.2,
        "payment_refund_retry_max": 1.0,
    }


def count(envelopes: Sequence[Envelope], event_type: str) -> int:
    return sum(1 for envelope in envelopes if envelope.type == event_type)


def compensation_problems(envelopes: Sequence[Envelope]) -> list[str]:
    """What breaks the rules for an order whose refund was retried; empty when all hold."""
    types = [envelope.type for envelope in envelopes]
    problems = [f"{name} {n} times" for name, n in Counter(types).items() if name != "PaymentRefundFailed" and n > 1]
    if len({envelope.event_id for envelope in envelopes}) != len(envelopes):
        problems.append("an event is on audit twice")
    position = {envelope.event_id: index for index, envelope in enumerate(envelopes)}
    for index, envelope in enumerate(envelopes):
        if envelope.causation_id in position and position[envelope.causation_id] > index:
            problems.append(f"{envelope.type} is on audit before its cause")
    failures = [envelope.data for envelope in envelopes if isinstance(envelope.data, PaymentRefundFailed)]
    if not failures:
        problems.append("no PaymentRefundFailed")
    if [failure.attempt for failure in failures] != list(range(1, len(failures) + 1)):
        problems.append(f"attempts {[failure.attempt for failure in failures]} are not 1, 2, ... in order")
    if any(later.retry_at <= earlier.retry_at for earlier, later in itertools.pairwise(failures)):
        problems.append("retry_at does not grow")

    def at(name: str) -> list[int]:
        return [index for index, seen in enumerate(types) if seen == name]

    for earlier, later in itertools.pairwise(["ShippingFailed", "PaymentRefundFailed", *COMPENSATED_ONCE]):
        if not at(earlier) or not at(later) or max(at(earlier)) > min(at(later)):
            problems.append(f"not every {earlier} is before every {later}")
    return problems


async def customer_ledger(settings: ChoreoSettings) -> dict[str, Any]:
    """The customer's latest credit ledger, as payment's changelog has it."""
    return (await customer_state(settings)).get(f"customer:{CUSTOMER}", {})


async def customer_state(settings: ChoreoSettings) -> dict[str, dict[str, Any]]:
    """The latest value of each of the customer's keys (its ledger, its settlements) on payment's changelog."""
    latest: dict[str, dict[str, Any]] = {}
    for record in await read_topic(settings, PAYMENT_STATE):
        key = record.key.decode()
        if key in (f"customer:{CUSTOMER}", *(f"settlement:{CUSTOMER}:{o}" for o in ORDER_IDS)) and record.value:
            latest[key] = json.loads(record.value)
    return latest


async def test_refunds_due_during_an_outage_are_retried_then_compensate_exactly_once(
    choreo_settings: ChoreoSettings,
) -> None:
    # Given the saga running with the refund provider down, and a customer's orders of which three fail shipping
    started = datetime.now(UTC)
    overrides = {"approval": {"approval_timeout": 3600}, "payment": outage(started, started + timedelta(hours=1))}
    failing, shipped = FAILING, SHIPPED
    async with SagaStack(choreo_settings, overrides) as stack:
        await stack.start()
        await publish(choreo_settings, [*(order(order_id, "AQ") for order_id in failing), order(shipped, "DE")])

        # When their refunds fall due during the outage
        # Then each is seen failing, and retried, on audit, while nothing is refunded or cancelled
        timelines = await eventually(
            lambda: audit_by_order(choreo_settings),
            lambda seen: (
                all(count(seen.get(order_id, []), "PaymentRefundFailed") >= 2 for order_id in failing)
                and count(seen.get(shipped, []), "OrderCompleted") == 1
            ),
            timeout=120,
        )
        for order_id in failing:
            assert count(timelines[order_id], "PaymentRefunded") == 0, timelines[order_id]
            assert count(timelines[order_id], "OrderCancelled") == 0, timelines[order_id]
        first_failure = next(e.data for e in timelines[failing[0]] if isinstance(e.data, PaymentRefundFailed))
        assert first_failure.reason == "refund provider unavailable"
        assert first_failure.amount == PRICE

        # When the provider comes back a few seconds after payment restarts
        await stack.stop("payment")
        stack.overrides["payment"] = outage(started, datetime.now(UTC) + RECOVERY_AFTER)
        await stack.start("payment")

        # Then every refund completes, and the order is compensated exactly once, in order
        timelines = await eventually(
            lambda: audit_by_order(choreo_settings),
            lambda seen: all(count(seen.get(order_id, []), "OrderCancelled") >= 1 for order_id in failing),
            timeout=120,
        )
        await stack.settle(timeout=120)
    timelines = await audit_by_order(choreo_settings)
    for order_id in failing:
        envelopes = timelines[order_id]
        types = [envelope.type for envelope in envelopes]
        assert types[:5] == ["OrderPlaced", "InventoryReserved", "PaymentCharged", "ApprovalGranted", "ShippingFailed"]
        assert [count(envelopes, name) for name in COMPENSATED_ONCE] == [1, 1, 1], types
        assert compensation_problems(envelopes) == [], types
        [refund] = [envelope.data for envelope in envelopes if isinstance(envelope.data, PaymentRefunded)]
        assert (refund.amount, refund.reason) == (PRICE, "shipping failed: destination country AQ is not served")
    assert [envelope.type for envelope in timelines[shipped]][-1] == "OrderCompleted"

    # And the customer's money is conserved: only the shipped order stays charged, and once it is
    # finalized its hold has left the ledger while its amount still counts as used
    ledger = await eventually(
        lambda: customer_ledger(choreo_settings), lambda found: Decimal(found.get("finalized_total", 0)) == PRICE
    )
    assert Decimal(ledger["charged_total"]) == 4 * PRICE
    assert Decimal(ledger["refunded_total"]) == 3 * PRICE
    assert Decimal(ledger["used"]) == PRICE
    assert ledger["holds"] == {}
    settlements = await customer_state(choreo_settings)
    outcomes = {order_id: settlements[f"settlement:{CUSTOMER}:{order_id}"]["outcome"] for order_id in ORDER_IDS}
    assert outcomes == {**dict.fromkeys(FAILING, "refunded"), SHIPPED: "charged"}
    assert await read_topic(choreo_settings, DEAD_LETTER) == []

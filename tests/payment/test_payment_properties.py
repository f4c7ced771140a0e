"""Property: whatever the arrival order and duplication of an order's events, payment acts once and conserves money.

Saga events of several orders (each: its InventoryReserved and up to two compensation triggers,
each delivered one to three times) arrive in any order; the ledger's internal messages keep
Kafka's per-partition order but interleave freely with everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import event as note
from hypothesis import strategies as st

from schemas.envelope import Envelope
from schemas.events import InventoryReserved, PaymentCharged, PaymentDeclined, PaymentRefunded, PaymentVoided
from services.payment.domain import LedgerOperation, LedgerReply, LedgerRequest, Phase
from tests.payment.harness import (
    Harness,
    approval_denied,
    approval_timed_out,
    details,
    reserved,
    shipment_cancelled,
    shipping_failed,
)

TRIGGERS: list[tuple[Callable[[str], Envelope], str]] = [
    (approval_denied, "approval denied"),
    (approval_timed_out, "approval timed out"),
    (lambda order_id: shipping_failed(order_id, "no carrier"), "shipping failed: no carrier"),
    (lambda order_id: shipment_cancelled(order_id, "changed my mind"), "order cancelled: changed my mind"),
]
CUSTOMERS = ("alice", "bob")


@dataclass(frozen=True)
class OrderCase:
    order_id: str
    customer_id: str
    price: Decimal
    triggers: tuple[int, ...]


@st.composite
def order_cases(draw: st.DrawFn) -> list[OrderCase]:
    count = draw(st.integers(min_value=1, max_value=4))
    return [
        OrderCase(
            order_id=f"o-{n}",
            customer_id=draw(st.sampled_from(CUSTOMERS)),
            price=Decimal(draw(st.sampled_from(["0.00", "10.00", "40.00", "60.00", "99.99"]))),
            triggers=tuple(draw(st.lists(st.integers(0, len(TRIGGERS) - 1), unique=True, max_size=2))),
        )
        for n in range(count)
    ]


def check_ledgers(harness: Harness) -> None:
    for ledger in harness.balances().values():
        assert Decimal(0) <= ledger.used <= ledger.credit_limit
        assert ledger.used == sum(ledger.holds.values(), Decimal(0))
        assert ledger.charged_total - ledger.refunded_total == ledger.used


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cases=order_cases(),
    limit=st.sampled_from([Decimal("0.00"), Decimal("50.00"), Decimal("100.00"), Decimal("1000.00")]),
    data=st.data(),
)
def test_any_arrival_order_charges_at_most_once_never_after_cancellation_and_conserves_money(
    cases: list[OrderCase], limit: Decimal, data: st.DataObject
) -> None:
    harness = Harness(limits=dict.fromkeys(CUSTOMERS, limit))
    bag: list[Envelope] = []
    reason_of: dict[str, str] = {}  # trigger event id -> the reason payment must give
    for case in cases:
        events = [reserved(case.order_id, details(case.customer_id, str(case.price)))]
        for kind in case.triggers:
            build, reason = TRIGGERS[kind]
            trigger_event = build(case.order_id)
            reason_of[str(trigger_event.event_id)] = reason
            events.append(trigger_event)
        for event in events:
            bag += [event] * data.draw(st.integers(min_value=1, max_value=3))

    first_trigger: dict[str, tuple[int, str]] = {}  # order -> (step, reason) of the first trigger delivered
    first_emitted: dict[str, int] = {}  # event id -> step it was first emitted
    sent_at: list[tuple[int, str, LedgerOperation]] = []
    raw_of: dict[str, bytes] = {}
    step = 0
    # A prompt ledger answers before the next saga event; otherwise everything interleaves freely.
    prompt_ledger = data.draw(st.booleans())
    while bag or harness.queues():
        queues = harness.queues()
        lowest = len(bag) if prompt_ledger and queues else 0
        pick = data.draw(st.integers(min_value=lowest, max_value=len(bag) + len(queues) - 1))
        if pick < len(bag):
            event = bag.pop(pick)
            outs = harness.publish(event)
            if not isinstance(event.data, InventoryReserved):
                first_trigger.setdefault(event.order_id, (step, reason_of[str(event.event_id)]))
        else:
            outs = harness.deliver_next(queues[pick - len(bag)])
        for out in outs:
            if isinstance(out.value, Envelope):
                event_id = str(out.value.event_id)
                first_emitted.setdefault(event_id, step)
                # A re-emission is byte-identical to the first: downstream deduplicates it by event_id.
                assert raw_of.setdefault(event_id, out.raw) == out.raw
            elif isinstance(out.value, LedgerRequest):
                sent_at.append((step, out.value.order_id, out.value.operation))
        check_ledgers(harness)
        step += 1

    stays_charged: dict[str, Decimal] = dict.fromkeys(CUSTOMERS, Decimal(0))
    refunded: dict[str, Decimal] = dict.fromkeys(CUSTOMERS, Decimal(0))
    for case in cases:
        emitted = {str(e.event_id): e for e in harness.events(case.order_id)}
        by_type: dict[type, list[Envelope]] = {}
        for e in emitted.values():
            by_type.setdefault(type(e.data), []).append(e)
        assert all(len(found) == 1 for found in by_type.values()), "one event of each type per order"
        kinds = set(by_type)
        note(
            "outcome: "
            + "+".join(sorted(kind.__name__ for kind in kinds))
            + (" after release" if _granted(harness, case.order_id) and PaymentVoided in kinds else "")
        )
        operations = [op for _, order_id, op in sent_at if order_id == case.order_id]
        assert len(operations) == len(set(operations)), "each ledger operation at most once per order"
        state = harness.order(case.order_id)
        assert state is not None
        assert not state.hold_pending

        trigger = first_trigger.get(case.order_id)
        if trigger is None:
            assert kinds in ({PaymentCharged}, {PaymentDeclined})
            assert state.phase in (Phase.CHARGED, Phase.DECLINED)
        else:
            trigger_step, reason = trigger
            assert kinds in ({PaymentCharged, PaymentRefunded}, {PaymentVoided}, {PaymentDeclined})
            assert state.phase in (Phase.REFUNDED, Phase.VOIDED, Phase.DECLINED)
            for hold_step, order_id, op in sent_at:
                if order_id == case.order_id and op is LedgerOperation.HOLD:
                    assert hold_step < trigger_step, "no hold is started for a cancelled order"
            if PaymentCharged in by_type:
                charge = by_type[PaymentCharged][0]
                assert first_emitted[str(charge.event_id)] < trigger_step, "never charged after a cancellation"
            if PaymentVoided in by_type:
                assert by_type[PaymentVoided][0].data == PaymentVoided(reason=reason)
                assert (LedgerOperation.RELEASE in operations) == _granted(harness, case.order_id)
            if PaymentRefunded in by_type:
                refund = by_type[PaymentRefunded][0].data
                assert isinstance(refund, PaymentRefunded)
                assert (refund.amount, refund.reason) == (case.price, reason)
                assert LedgerOperation.REFUND in operations
        if PaymentCharged in kinds and PaymentRefunded not in kinds:
            stays_charged[case.customer_id] += case.price
        if PaymentRefunded in kinds:
            refunded[case.customer_id] += case.price

    balances = harness.balances()
    for customer in CUSTOMERS:
        ledger = balances.get(customer)
        if ledger is None:
            assert stays_charged[customer] == refunded[customer] == Decimal(0)
            continue
        assert ledger.charged_total - ledger.refunded_total == stays_charged[customer] == ledger.used
        assert ledger.refunded_total == refunded[customer]
        assert set(ledger.holds) == {
            case.order_id
            for case in cases
            if case.customer_id == customer and (s := harness.order(case.order_id)) and s.phase is Phase.CHARGED
        }


def _granted(harness: Harness, order_id: str) -> bool:
    """Whether the ledger granted the order's hold."""
    return any(
        isinstance(out.value, LedgerReply) and out.value.order_id == order_id and out.value.held for out in harness.log
    )

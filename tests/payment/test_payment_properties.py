"""Property: whatever the arrival order and duplication of an order's events, and however often the refund
provider fails, payment acts once, never skips or doubles a refund, and conserves money.

Saga events of several orders (each: its InventoryReserved and up to two compensation triggers,
each delivered one to three times) arrive in any order; the ledger's internal messages keep
Kafka's per-partition order but interleave freely with everything else; ticks, moving the clock
by any amount, interleave too, and the refund provider fails the first zero to three attempts of each order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import event as note
from hypothesis import strategies as st

from schemas.envelope import Envelope
from schemas.events import (
    InventoryReserved,
    PaymentCharged,
    PaymentDeclined,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentVoided,
)
from services.payment.domain import LedgerOperation, LedgerReply, LedgerRequest, Phase
from tests.payment.harness import (
    FlakyRefunds,
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
    refund_failures: int


# Clock steps a tick may take: none, less than the first wait, about it, and past the longest wait.
TICK_STEPS = [
    timedelta(0),
    timedelta(milliseconds=400),
    timedelta(seconds=1),
    timedelta(seconds=3),
    timedelta(minutes=1),
]


@st.composite
def order_cases(draw: st.DrawFn) -> list[OrderCase]:
    count = draw(st.integers(min_value=1, max_value=4))
    return [
        OrderCase(
            order_id=f"o-{n}",
            customer_id=draw(st.sampled_from(CUSTOMERS)),
            price=Decimal(draw(st.sampled_from(["0.00", "10.00", "40.00", "60.00", "99.99"]))),
            triggers=tuple(draw(st.lists(st.integers(0, len(TRIGGERS) - 1), unique=True, max_size=2))),
            refund_failures=draw(st.integers(min_value=0, max_value=3)),
        )
        for n in range(count)
    ]


def check_ledgers(harness: Harness) -> None:
    for ledger in harness.balances().values():
        assert Decimal(0) <= ledger.used <= ledger.credit_limit
        assert ledger.used == sum(ledger.holds.values(), Decimal(0)) + ledger.finalized_total
        assert ledger.charged_total - ledger.refunded_total == ledger.used


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cases=order_cases(),
    limit=st.sampled_from([Decimal("0.00"), Decimal("50.00"), Decimal("100.00"), Decimal("1000.00")]),
    data=st.data(),
)
def test_any_arrival_order_and_refund_outage_charges_and_refunds_at_most_once_and_conserves_money(
    cases: list[OrderCase], limit: Decimal, data: st.DataObject
) -> None:
    provider = FlakyRefunds(per_order={case.order_id: case.refund_failures for case in cases})
    harness = Harness(limits=dict.fromkeys(CUSTOMERS, limit), refunds=provider)
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
    while bag or harness.queues() or refunds_pending(harness, [case.order_id for case in cases]):
        queues = harness.queues()
        lowest = len(bag) if prompt_ledger and queues else 0
        # The last choice is a tick.
        pick = data.draw(st.integers(min_value=lowest, max_value=len(bag) + len(queues)))
        if pick < len(bag):
            event = bag.pop(pick)
            outs = harness.publish(event)
            if not isinstance(event.data, InventoryReserved):
                first_trigger.setdefault(event.order_id, (step, reason_of[str(event.event_id)]))
        elif pick < len(bag) + len(queues):
            outs = harness.deliver_next(queues[pick - len(bag)])
        else:
            # Once only retries are left, time moves on enough for them to finish.
            only_retries = not bag and not queues
            outs = harness.tick(
                harness.now + (TICK_STEPS[-1] if only_retries else data.draw(st.sampled_from(TICK_STEPS)))
            )
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
        failures = by_type.pop(PaymentRefundFailed, [])
        assert all(len(found) == 1 for found in by_type.values()), "one event of each type per order"
        kinds = set(by_type)
        note(f"refund attempts failed: {len(failures)}")
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
                # Never skipped: the provider's failures were each announced, in order, before the refund
                attempts = [e.data for e in sorted(failures, key=lambda e: first_emitted[str(e.event_id)])]
                assert [a.attempt for a in attempts if isinstance(a, PaymentRefundFailed)] == list(
                    range(1, case.refund_failures + 1)
                )
                retry_times = [a.retry_at for a in attempts if isinstance(a, PaymentRefundFailed)]
                assert retry_times == sorted(retry_times)
                refunded_at = first_emitted[str(by_type[PaymentRefunded][0].event_id)]
                assert all(first_emitted[str(e.event_id)] < refunded_at for e in failures)
                assert sum(1 for attempt in provider.attempts if attempt[0] == case.order_id) == (
                    case.refund_failures + 1
                )
        if PaymentRefunded not in kinds:
            assert failures == [], "a refund attempt is made only for a charge being refunded"
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


def refunds_pending(harness: Harness, order_ids: Iterable[str]) -> bool:
    return any((state := harness.order(order_id)) and state.phase is Phase.REFUND_PENDING for order_id in order_ids)


def _granted(harness: Harness, order_id: str) -> bool:
    """Whether the ledger granted the order's hold."""
    return any(
        isinstance(out.value, LedgerReply) and out.value.order_id == order_id and out.value.held for out in harness.log
    )


@settings(max_examples=200, deadline=None)
@given(
    failures=st.integers(min_value=0, max_value=5),
    kinds=st.lists(st.integers(0, len(TRIGGERS) - 1), min_size=1, max_size=3),
    data=st.data(),
)
def test_a_charged_order_is_refunded_exactly_once_whatever_the_outage_redeliveries_and_ticks(
    failures: int, kinds: list[int], data: st.DataObject
) -> None:
    provider = FlakyRefunds(failures=failures)
    harness = Harness(refunds=provider)
    harness.publish(reserved("o-1", details("alice", "40.00")))
    harness.pump()
    bag = [
        trigger for trigger in (TRIGGERS[kind][0]("o-1") for kind in kinds) for _ in range(data.draw(st.integers(1, 3)))
    ]
    raw_of: dict[str, bytes] = {}
    while bag or harness.queues() or refunds_pending(harness, ["o-1"]):
        queues = harness.queues()
        pick = data.draw(st.integers(min_value=0, max_value=len(bag) + len(queues)))
        if pick < len(bag):
            outs = harness.publish(bag.pop(pick))
        elif pick < len(bag) + len(queues):
            outs = harness.deliver_next(queues[pick - len(bag)])
        else:
            step = TICK_STEPS[-1] if not bag and not queues else data.draw(st.sampled_from(TICK_STEPS))
            outs = harness.tick(harness.now + step)
        for out in outs:
            if isinstance(out.value, Envelope):
                assert raw_of.setdefault(str(out.value.event_id), out.raw) == out.raw
        check_ledgers(harness)

    distinct = {str(e.event_id): e for e in harness.events("o-1")}.values()
    assert sorted(e.type for e in distinct if e.type != "PaymentRefundFailed") == ["PaymentCharged", "PaymentRefunded"]
    attempts = sorted(e.data.attempt for e in distinct if isinstance(e.data, PaymentRefundFailed))
    assert attempts == list(range(1, failures + 1))
    assert len(provider.attempts) == failures + 1
    assert [r.operation for r in harness.requests("o-1")] == [LedgerOperation.HOLD, LedgerOperation.REFUND]
    ledger = harness.ledger("alice")
    assert ledger is not None
    assert (ledger.used, ledger.charged_total, ledger.refunded_total) == (
        Decimal(0),
        Decimal("40.00"),
        Decimal("40.00"),
    )

"""Given/When/Then tests of the payment service: the real StreamApp, real TaskContexts, in-memory stores."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.envelope import Envelope, Source
from schemas.events import (
    ApprovalGranted,
    Event,
    InventoryRejected,
    InventoryReleased,
    OrderCancelled,
    OrderCompleted,
    PaymentCharged,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    ShipmentScheduled,
    StockLine,
)
from schemas.topics import (
    APPROVAL_EVENTS,
    DEAD_LETTER,
    INVENTORY_EVENTS,
    LEDGER_REPLIES,
    LEDGER_REQUESTS,
    PAYMENT_EVENTS,
    PAYMENT_STATE,
    SHIPPING_EVENTS,
)
from services.common.kafka import partition_for
from services.payment.app import PaymentApp, build_app, customer_key, settlement_key
from services.payment.domain import (
    CustomerFileError,
    CustomerLedger,
    LedgerChange,
    LedgerOperation,
    LedgerReply,
    LedgerRequest,
    Phase,
    Settlement,
    load_customers,
)
from services.payment.settings import DEFAULT_CUSTOMERS, PaymentSettings
from tests.payment.harness import (
    SETTINGS,
    Harness,
    Out,
    approval_denied,
    approval_timed_out,
    details,
    envelope,
    reserved,
    shipment_cancelled,
    shipping_failed,
)

ALICE = "alice"
RETENTION_MS = int(SETTINGS.order_retention.total_seconds() * 1000)


def payment_events(outs: list[Out]) -> list[Envelope]:
    return [out.value for out in outs if out.topic == PAYMENT_EVENTS]


def ledger_requests(outs: list[Out]) -> list[LedgerRequest]:
    return [out.value for out in outs if out.topic == LEDGER_REQUESTS]


def dead_letters(outs: list[Out]) -> list[str]:
    return [out.value.reason for out in outs if out.topic == DEAD_LETTER]


def charged(harness: Harness, order_id: str, *prices: str, customer: str = ALICE) -> Envelope:
    """Given an order whose payment was charged; returns its InventoryReserved."""
    trigger = reserved(order_id, details(customer, *prices))
    harness.publish(trigger)
    harness.pump()
    state = harness.order(order_id)
    assert state is not None
    assert state.phase is Phase.CHARGED
    return trigger


# --- the happy path -----------------------------------------------------------------------------


def test_reserved_order_holds_credit_then_is_charged_with_the_reservation_as_cause() -> None:
    harness = Harness(limits={ALICE: Decimal("500.00")})
    order = details(ALICE, "100.00", "20.50")
    trigger = reserved("o-1", order)

    sent = harness.publish(trigger)

    assert [(out.topic, out.key) for out in sent] == [(LEDGER_REQUESTS, ALICE)]
    assert sent[0].value == LedgerRequest(
        operation=LedgerOperation.HOLD, customer_id=ALICE, order_id="o-1", amount=Decimal("120.50")
    )
    state = harness.order("o-1")
    assert state is not None
    assert state.phase is Phase.HOLDING
    assert state.hold_pending

    answered = harness.deliver_next(harness.queues()[0])

    assert [(out.topic, out.key, out.value) for out in answered] == [
        (LEDGER_REPLIES, "o-1", LedgerReply(order_id="o-1", customer_id=ALICE, held=True, amount=Decimal("120.50")))
    ]
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert (ledger.used, ledger.charged_total, ledger.holds) == (
        Decimal("120.50"),
        Decimal("120.50"),
        {"o-1": Decimal("120.50")},
    )

    emitted = harness.pump()

    [event] = payment_events(emitted)
    assert event.data == PaymentCharged(order=order, amount=Decimal("120.50"), currency="EUR")
    assert event.causation_id == trigger.event_id
    assert event.event_id == Envelope.new(event.data, order_id="o-1", source=Source.PAYMENT, cause=trigger).event_id
    assert event.source is Source.PAYMENT
    state = harness.order("o-1")
    assert state is not None
    assert state.phase is Phase.CHARGED
    assert not state.hold_pending
    assert state.handled[str(trigger.event_id)] == [event.model_dump_json()]


def test_a_hold_beyond_the_credit_limit_is_declined_and_moves_no_credit() -> None:
    harness = Harness(limits={"no-credit": Decimal("0.00")})
    trigger = reserved("o-1", details("no-credit", "10.00"))

    harness.publish(trigger)
    emitted = harness.pump()

    [event] = payment_events(emitted)
    assert event.data == PaymentDeclined(
        customer_id="no-credit",
        amount=Decimal("10.00"),
        currency="EUR",
        reason="credit limit exceeded: available 0.00",
    )
    assert event.causation_id == trigger.event_id
    assert harness.ledger("no-credit") is None  # nothing moved, so nothing was written
    settlement = harness.settlement("no-credit", "o-1")
    assert settlement is not None
    assert (settlement.outcome, settlement.amount) == ("declined", Decimal("10.00"))
    state = harness.order("o-1")
    assert state is not None
    assert state.phase is Phase.DECLINED


def test_orders_share_the_customer_limit_and_a_refund_restores_it() -> None:
    harness = Harness(limits={ALICE: Decimal("1000.00")})
    charged(harness, "o-1", "800.00")

    harness.publish(reserved("o-2", details(ALICE, "500.00")))
    [declined] = payment_events(harness.pump())
    assert declined.data == PaymentDeclined(
        customer_id=ALICE, amount=Decimal("500.00"), currency="EUR", reason="credit limit exceeded: available 200.00"
    )

    denial = approval_denied("o-1")
    emitted = harness.publish(denial)

    [refund] = payment_events(emitted)
    assert refund.data == PaymentRefunded(
        customer_id=ALICE, amount=Decimal("800.00"), currency="EUR", reason="approval denied"
    )
    assert refund.causation_id == denial.event_id
    assert ledger_requests(emitted) == [
        LedgerRequest(operation=LedgerOperation.REFUND, customer_id=ALICE, order_id="o-1", amount=Decimal("800.00"))
    ]
    harness.pump()
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert (ledger.used, ledger.charged_total, ledger.refunded_total) == (
        Decimal(0),
        Decimal("800.00"),
        Decimal("800.00"),
    )

    charged(harness, "o-3", "500.00")
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert ledger.available == Decimal("500.00")


def test_customers_not_in_the_file_get_the_default_limit() -> None:
    harness = Harness(default_limit=Decimal("50.00"))
    harness.publish(reserved("o-1", details("stranger", "60.00")))
    [event] = payment_events(harness.pump())
    assert isinstance(event.data, PaymentDeclined)
    assert event.data.reason == "credit limit exceeded: available 50.00"


def completed(order_id: str, total: str = "40.00") -> Envelope:
    return envelope(
        OrderCompleted(customer_id=ALICE, total=Decimal(total), currency="EUR", items=[]), order_id, Source.SHIPPING
    )


def test_a_completed_order_leaves_the_ledger_and_its_charge_keeps_using_credit() -> None:
    # Given two charged orders of one customer
    harness = Harness(limits={ALICE: Decimal("100.00")})
    charged(harness, "o-1", "40.00")
    charged(harness, "o-2", "30.00")

    # When the first completes (and its completion is delivered twice)
    done = completed("o-1")
    emitted = harness.publish(done)
    harness.pump()
    harness.publish(done)
    harness.pump()

    # Then the ledger is asked once to finalize it: its hold leaves, its amount stays used
    assert ledger_requests(emitted) == [
        LedgerRequest(operation=LedgerOperation.FINALIZE, customer_id=ALICE, order_id="o-1", amount=Decimal("40.00"))
    ]
    assert payment_events(emitted) == []
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert ledger.holds == {"o-2": Decimal("30.00")}
    assert (ledger.used, ledger.finalized_total, ledger.charged_total) == (
        Decimal("70.00"),
        Decimal("40.00"),
        Decimal("70.00"),
    )
    assert ledger.settled == {}
    settlement = harness.settlement(ALICE, "o-1")
    assert settlement is not None
    assert settlement.outcome == "charged"
    state = harness.order("o-1")
    assert state is not None
    assert state.completed
    assert state.finished()


@pytest.mark.parametrize(
    "trigger",
    [approval_denied, lambda order_id: shipment_cancelled(order_id, "too late")],
    ids=["approval denied", "shipment cancelled"],
)
def test_a_trigger_after_completion_refunds_nothing(trigger: Callable[[str], Envelope]) -> None:
    harness = Harness()
    charged(harness, "o-1", "40.00")
    harness.publish(completed("o-1"))
    harness.pump()

    emitted = harness.publish(trigger("o-1"))
    harness.pump()

    assert payment_events(emitted) == []
    assert ledger_requests(emitted) == []
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert (ledger.used, ledger.refunded_total, ledger.holds) == (Decimal("40.00"), Decimal(0), {})


# --- compensation -------------------------------------------------------------------------------

TRIGGERS: list[tuple[Callable[[str], Envelope], str]] = [
    (approval_denied, "approval denied"),
    (approval_timed_out, "approval timed out"),
    (lambda order_id: shipping_failed(order_id, "no carrier to AQ"), "shipping failed: no carrier to AQ"),
    (lambda order_id: shipment_cancelled(order_id, "too slow"), "order cancelled: too slow"),
]


@pytest.mark.parametrize(("trigger", "reason"), TRIGGERS)
def test_a_charged_order_is_refunded_on_every_compensation_trigger(
    trigger: Callable[[str], Envelope], reason: str
) -> None:
    harness = Harness()
    charged(harness, "o-1", "40.00")
    cause = trigger("o-1")

    emitted = harness.publish(cause)

    [event] = payment_events(emitted)
    assert event.data == PaymentRefunded(customer_id=ALICE, amount=Decimal("40.00"), currency="EUR", reason=reason)
    assert event.causation_id == cause.event_id
    harness.pump()
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert (ledger.used, ledger.refunded_total, ledger.holds) == (Decimal(0), Decimal("40.00"), {})
    assert ledger.settled == {}
    settlement = harness.settlement(ALICE, "o-1")
    assert settlement is not None
    assert settlement.outcome == "refunded"
    state = harness.order("o-1")
    assert state is not None
    assert (state.phase, state.closed_reason) == (Phase.REFUNDED, reason)


@pytest.mark.parametrize(("trigger", "reason"), TRIGGERS)
def test_a_trigger_while_the_hold_is_in_flight_voids_and_the_granted_hold_is_released(
    trigger: Callable[[str], Envelope], reason: str
) -> None:
    harness = Harness()
    harness.publish(reserved("o-1", details(ALICE, "40.00")))
    cause = trigger("o-1")

    emitted = harness.publish(cause)

    [event] = payment_events(emitted)
    assert event.data == PaymentVoided(reason=reason)
    assert event.causation_id == cause.event_id

    harness.deliver_next(harness.queues()[0])  # the ledger grants the hold after all
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert ledger.used == Decimal("40.00")

    emitted = harness.pump()

    assert payment_events(emitted) == []
    assert ledger_requests(emitted) == [
        LedgerRequest(operation=LedgerOperation.RELEASE, customer_id=ALICE, order_id="o-1", amount=Decimal("40.00"))
    ]
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert (ledger.used, ledger.charged_total, ledger.refunded_total, ledger.holds) == (
        Decimal(0),
        Decimal(0),
        Decimal(0),
        {},
    )
    assert ledger.settled == {}
    settlement = harness.settlement(ALICE, "o-1")
    assert settlement is not None
    assert settlement.outcome == "released"
    assert [e.type for e in harness.events("o-1")] == ["PaymentVoided"]


def test_a_cancellation_while_a_decline_is_in_flight_voids_and_emits_no_decline() -> None:
    harness = Harness(limits={ALICE: Decimal("0.00")})
    harness.publish(reserved("o-1", details(ALICE, "40.00")))
    harness.publish(shipment_cancelled("o-1"))

    emitted = harness.pump()

    assert payment_events(emitted) == []
    assert [e.type for e in harness.events("o-1")] == ["PaymentVoided"]
    assert [r.operation for r in harness.requests("o-1")] == [LedgerOperation.HOLD]


def test_a_cancellation_before_the_reservation_voids_and_the_late_reservation_is_ignored() -> None:
    harness = Harness()
    cancel = shipment_cancelled("o-1", "ordered twice")

    [out] = harness.publish(cancel)
    assert out.value.data == PaymentVoided(reason="order cancelled: ordered twice")

    late = harness.publish(reserved("o-1", details(ALICE, "40.00")))

    assert late == []
    assert harness.requests() == []
    state = harness.order("o-1")
    assert state is not None
    assert state.phase is Phase.VOIDED
    assert harness.balances() == {}


@pytest.mark.parametrize("second", [t for t, _ in TRIGGERS])
def test_a_closed_payment_ignores_further_triggers(second: Callable[[str], Envelope]) -> None:
    declined_harness = Harness(limits={ALICE: Decimal("0.00")})
    declined_harness.publish(reserved("o-1", details(ALICE, "40.00")))
    declined_harness.pump()
    refunded_harness = Harness()
    charged(refunded_harness, "o-1", "40.00")
    refunded_harness.publish(approval_denied("o-1"))
    refunded_harness.pump()
    voided_harness = Harness()
    voided_harness.publish(approval_timed_out("o-1"))

    for harness in (declined_harness, refunded_harness, voided_harness):
        before = harness.order("o-1")
        assert harness.publish(second("o-1")) == []
        after = harness.order("o-1")
        assert before is not None
        assert after is not None
        assert after.phase is before.phase


# --- duplicates ---------------------------------------------------------------------------------


def test_a_duplicate_reservation_while_holding_sends_no_second_hold() -> None:
    harness = Harness()
    trigger = reserved("o-1", details(ALICE, "40.00"))
    harness.publish(trigger)

    assert harness.publish(trigger) == []

    harness.pump()
    assert [r.operation for r in harness.requests()] == [LedgerOperation.HOLD]
    assert len(harness.events("o-1")) == 1


def test_a_duplicate_reservation_after_the_charge_re_emits_the_same_charge() -> None:
    harness = Harness()
    trigger = charged(harness, "o-1", "40.00")
    [first] = harness.events("o-1")

    again = harness.publish(trigger)

    assert [out.raw for out in again] == [first.to_bytes()]
    assert len(harness.requests()) == 1
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert ledger.charged_total == Decimal("40.00")


def test_a_duplicate_trigger_re_emits_the_same_refund_and_refunds_once() -> None:
    harness = Harness()
    charged(harness, "o-1", "40.00")
    denial = approval_denied("o-1")
    [first] = payment_events(harness.publish(denial))
    harness.pump()

    again = harness.publish(denial)

    assert [out.value for out in again] == [first]
    assert ledger_requests(again) == []
    harness.pump()
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert ledger.refunded_total == Decimal("40.00")


def test_a_duplicate_ledger_reply_changes_nothing() -> None:
    harness = Harness()
    charged(harness, "o-1", "40.00")
    reply = LedgerReply(order_id="o-1", customer_id=ALICE, held=True, amount=Decimal("40.00"))

    assert harness.deliver(LEDGER_REPLIES, b"o-1", reply.model_dump_json().encode()) == []
    assert len(harness.events("o-1")) == 1


def test_a_repeated_ledger_request_moves_credit_once() -> None:
    harness = Harness()
    hold = LedgerRequest(operation=LedgerOperation.HOLD, customer_id=ALICE, order_id="o-9", amount=Decimal("10.00"))
    refund = hold.model_copy(update={"operation": LedgerOperation.REFUND})
    for request in (hold, hold, refund, refund, hold):
        harness.deliver(LEDGER_REQUESTS, ALICE.encode(), request.model_dump_json().encode())

    replies = [out.value for out in harness.log if out.topic == LEDGER_REPLIES]
    assert [(r.held, r.reason) for r in replies] == [(True, None), (True, None), (False, "hold already refunded")]
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert (ledger.used, ledger.charged_total, ledger.refunded_total) == (
        Decimal(0),
        Decimal("10.00"),
        Decimal("10.00"),
    )


# --- events payment does not react to, and poison ----------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        InventoryRejected(reason="out of stock"),
        InventoryReleased(items=[StockLine(sku="sku-0", quantity=1)], reason="cancelled"),
        OrderCancelled(reason="cancelled"),
        ApprovalGranted(order=details(), reviewer="system", reason="below threshold"),
        ShipmentScheduled(shipment_id="s-1", carrier="post", ship_to="FR"),
        OrderCompleted(customer_id=ALICE, total=Decimal("1.00"), currency="EUR", items=[]),
    ],
    ids=lambda event: type(event).__name__,
)
def test_other_events_are_ignored(event: Event) -> None:
    harness = Harness()
    assert harness.publish(envelope(event, "o-1", Source.INVENTORY)) == []
    assert harness.order("o-1") is None


def test_poison_saga_records_are_dead_lettered() -> None:
    harness = Harness()
    wrong_topic = envelope(PaymentVoided(reason="x"), "o-1", Source.PAYMENT)
    key = b"o-1"

    outs = harness.deliver(INVENTORY_EVENTS, key, b"{not json")
    outs += harness.deliver(APPROVAL_EVENTS, key, wrong_topic.to_bytes())
    outs += harness.deliver(SHIPPING_EVENTS, b"other", shipping_failed("o-1").to_bytes())

    reasons = dead_letters(outs)
    assert len(reasons) == 3
    assert reasons[0].startswith("not JSON")
    assert "not carried on topic approval.events" in reasons[1]
    assert reasons[2].startswith("key:")
    assert harness.order("o-1") is None


def test_poison_internal_messages_are_dead_lettered() -> None:
    harness = Harness()
    hold = LedgerRequest(operation=LedgerOperation.HOLD, customer_id=ALICE, order_id="o-1", amount=Decimal("1.00"))
    wrong_partition = (partition_for(ALICE.encode(), SETTINGS.partitions) + 1) % SETTINGS.partitions
    orphan = LedgerReply(order_id="o-404", customer_id=ALICE, held=True, amount=Decimal("1.00"))

    outs = harness.deliver(LEDGER_REQUESTS, ALICE.encode(), b'{"operation": "steal"}')
    outs += harness.deliver(LEDGER_REQUESTS, b"bob", hold.model_dump_json().encode())
    outs += harness.deliver(LEDGER_REQUESTS, ALICE.encode(), hold.model_dump_json().encode(), wrong_partition)
    outs += harness.deliver(LEDGER_REQUESTS, ALICE.encode(), None)
    outs += harness.deliver(LEDGER_REPLIES, b"o-404", orphan.model_dump_json().encode())

    reasons = dead_letters(outs)
    assert len(outs) == len(reasons) == 5
    assert reasons[0].startswith("invalid LedgerRequest: operation:")
    assert reasons[1] == "key: the record key must equal customer_id 'alice'"
    assert reasons[2].startswith("partition:")
    assert reasons[3].startswith("value: empty")
    assert reasons[4] == "order_id: no hold was requested for order 'o-404'"
    assert harness.balances() == {}


# --- the ledger on its own ----------------------------------------------------------------------


class LedgerKeeper:
    """The ledger and its settlements as the ledger stage keeps them: settlements beside the ledger."""

    def __init__(self, credit_limit: str) -> None:
        self.ledger = CustomerLedger(customer_id=ALICE, credit_limit=Decimal(credit_limit))
        self.settled: dict[str, Settlement] = {}

    def apply(self, change: LedgerChange, order_id: str) -> LedgerReply | None:
        self.ledger = change.ledger
        if change.settled is not None:
            self.settled[order_id] = change.settled
        return change.reply

    def hold(self, order_id: str, amount: str) -> LedgerReply:
        reply = self.apply(self.ledger.hold(order_id, Decimal(amount), self.settled.get(order_id)), order_id)
        assert reply is not None
        return reply


def test_ledger_rules() -> None:
    keeper = LedgerKeeper("100.00")

    reply = keeper.hold("o-1", "60.00")
    assert reply.held
    held = keeper.ledger
    assert keeper.hold("o-1", "60.00") == reply
    assert keeper.ledger == held
    refused = keeper.hold("o-2", "40.01")
    assert (refused.held, refused.reason) == (False, "credit limit exceeded: available 40.00")
    assert keeper.settled["o-2"].outcome == "declined"
    assert keeper.hold("o-2", "1.00") == refused  # a decline answers the same
    assert keeper.hold("o-3", "40.00").held
    assert keeper.ledger.available == Decimal(0)

    unchanged = keeper.ledger
    assert unchanged.release("o-unknown") == LedgerChange(unchanged)
    assert unchanged.refund("o-unknown") == LedgerChange(unchanged)
    keeper.apply(keeper.ledger.release("o-3"), "o-3")
    keeper.apply(keeper.ledger.refund("o-1"), "o-1")
    ledger = keeper.ledger
    assert (ledger.used, ledger.charged_total, ledger.refunded_total, ledger.holds) == (
        Decimal(0),
        Decimal("60.00"),
        Decimal("60.00"),
        {},
    )
    assert {order_id: found.outcome for order_id, found in keeper.settled.items()} == {
        "o-1": "refunded",
        "o-2": "declined",
        "o-3": "released",
    }
    assert ledger.release("o-1") == LedgerChange(ledger)

    keeper.hold("o-4", "25.00")
    keeper.apply(keeper.ledger.finalize("o-4"), "o-4")
    finalized = keeper.ledger
    assert (finalized.used, finalized.finalized_total, finalized.holds) == (Decimal("25.00"), Decimal("25.00"), {})
    assert finalized.finalize("o-4") == LedgerChange(finalized)
    assert finalized.refund("o-4") == LedgerChange(finalized)  # a completed charge is never taken back
    again = keeper.hold("o-4", "25.00")
    assert (again.held, again.reason) == (False, "hold already charged")
    assert keeper.ledger == finalized


def test_a_ledger_stays_the_size_of_its_orders_in_flight_and_settlements_expire_after_the_horizon() -> None:
    # Given many orders of one customer, each held and completed
    harness = Harness()
    for n in range(50):
        charged(harness, f"o-many-{n}", "1.00")
        harness.publish(completed(f"o-many-{n}"))
        harness.pump()

    # Then the ledger carries no settlement (each is a key of its own), and every one expires a horizon later
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert (ledger.holds, ledger.settled, ledger.finalized_total) == ({}, {}, Decimal("50.00"))
    store = harness.store_of(ALICE)
    assert all(harness.settlement(ALICE, f"o-many-{n}") is not None for n in range(50))
    # The harness's tasks stand at stream time 0.
    assert {store.expires_at(settlement_key(ALICE, f"o-many-{n}")) for n in range(50)} == {RETENTION_MS}


def test_settlements_a_ledger_kept_inside_it_move_to_keys_of_their_own_and_still_answer() -> None:
    # Given a ledger written by an older version, with a settled order inside it
    harness = Harness()
    store = harness.store_of(ALICE)
    legacy = CustomerLedger(
        customer_id=ALICE,
        credit_limit=Decimal("100.00"),
        settled={"o-old": Settlement(outcome="refunded", amount=Decimal("10.00"), at_ms=5_000)},
    )
    store.put(customer_key(ALICE), legacy)
    store.commit()

    # When a hold for that order arrives again
    hold = LedgerRequest(operation=LedgerOperation.HOLD, customer_id=ALICE, order_id="o-old", amount=Decimal("10"))
    [out] = harness.deliver(LEDGER_REQUESTS, ALICE.encode(), hold.model_dump_json().encode())

    # Then it is answered as settled, and the settlement has moved out of the ledger with its own expiry
    assert out.value == LedgerReply(
        order_id="o-old", customer_id=ALICE, held=False, amount=Decimal("10.00"), reason="hold already refunded"
    )
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert (ledger.settled, ledger.used) == ({}, Decimal(0))
    assert harness.settlement(ALICE, "o-old") == legacy.settled["o-old"]
    assert store.expires_at(settlement_key(ALICE, "o-old")) == 5_000 + RETENTION_MS


# --- settings and wiring ------------------------------------------------------------------------


def test_settings_defaults_and_the_shipped_customers_file() -> None:
    settings = PaymentSettings()
    assert settings.health_port == 8102
    assert settings.payment_default_credit_limit == Decimal("5000.00")
    assert settings.payment_customers == DEFAULT_CUSTOMERS
    limits = settings.credit_limits()
    assert limits.of("big-spender") == Decimal("100000.00")
    assert limits.of("no-credit") == Decimal("0.00")
    assert limits.of("someone-else") == Decimal("5000.00")


def test_settings_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    customers = tmp_path / "customers.json"
    customers.write_text(json.dumps({"zoe": {"credit_limit": "12.34"}}))
    monkeypatch.setenv("CHOREO_PAYMENT_CUSTOMERS", str(customers))
    monkeypatch.setenv("CHOREO_PAYMENT_DEFAULT_CREDIT_LIMIT", "7.50")

    limits = PaymentSettings().credit_limits()

    assert (limits.of("zoe"), limits.of("other")) == (Decimal("12.34"), Decimal("7.50"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"zoe": {"credit_limit": 12.5}}', "customer 'zoe': credit_limit: must be a decimal string"),
        ('{"zoe": {"credit_limit": "-1"}}', "customer 'zoe': credit_limit:"),
        ('{"zoe": {"limit": "1.00"}}', "customer 'zoe': credit_limit: Field required"),
        ('{"bad id!": {"credit_limit": "1.00"}}', "customer 'bad id!': not a valid customer id"),
        ('["zoe"]', "expected an object of customers"),
        ("{oops", "not JSON"),
    ],
)
def test_a_bad_customers_file_names_the_bad_entry(tmp_path: Path, content: str, message: str) -> None:
    customers = tmp_path / "customers.json"
    customers.write_text(content)

    with pytest.raises(CustomerFileError, match=re.escape(message)):
        load_customers(customers)
    with pytest.raises(ValidationError, match=re.escape(message)):
        PaymentSettings(payment_customers=customers)


def test_a_missing_customers_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(CustomerFileError, match="cannot read the customers file"):
        load_customers(tmp_path / "absent.json")


def test_build_app_wires_the_topics() -> None:
    app = build_app(PaymentSettings())
    assert isinstance(app, PaymentApp)
    assert app.name == "payment"
    assert tuple(app.inputs) == (INVENTORY_EVENTS, APPROVAL_EVENTS, SHIPPING_EVENTS, LEDGER_REQUESTS, LEDGER_REPLIES)
    assert app.changelog == PAYMENT_STATE


def test_ledger_balances_reads_only_customer_ledgers() -> None:
    harness = Harness()
    charged(harness, "o-1", "10.00")
    charged(harness, "o-2", "5.00", customer="bob")

    balances = harness.balances()

    assert sorted(balances) == [ALICE, "bob"]
    assert balances[ALICE].used == Decimal("10.00")
    assert balances["bob"].holds == {"o-2": Decimal("5.00")}
    assert uuid.UUID(str(harness.events("o-1")[0].event_id))

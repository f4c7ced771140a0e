"""Given/When/Then tests of refunds through a refund provider that can fail: retried with backoff, never skipped,
never doubled. The real StreamApp, real TaskContexts, in-memory stores; the clock is the test's."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from pydantic import ValidationError

from schemas.envelope import Envelope, Source
from schemas.events import PaymentRefunded, PaymentRefundFailed
from schemas.topics import LEDGER_REQUESTS, PAYMENT_EVENTS
from services.payment.app import REFUND_RETRIES_KEY, build_app, refund_failure_id, refund_provider
from services.payment.domain import LedgerOperation, LedgerRequest, Phase, RefundRetryIndex
from services.payment.refunds import (
    PROVIDER_UNAVAILABLE,
    LedgerRefunds,
    OutageWindow,
    RefundBackoff,
    RefundFailure,
    ScheduledOutages,
)
from services.payment.settings import PaymentSettings
from tests.payment.harness import (
    T0,
    FlakyRefunds,
    Harness,
    Out,
    approval_denied,
    approval_timed_out,
    details,
    reserved,
    shipment_cancelled,
    shipping_failed,
)

ALICE = "alice"
SECOND = timedelta(seconds=1)


def payment_events(outs: list[Out]) -> list[Envelope]:
    return [out.value for out in outs if out.topic == PAYMENT_EVENTS]


def ledger_requests(outs: list[Out]) -> list[LedgerRequest]:
    return [out.value for out in outs if out.topic == LEDGER_REQUESTS]


def charged_order(harness: Harness, order_id: str = "o-1", price: str = "40.00") -> None:
    harness.publish(reserved(order_id, details(ALICE, price)))
    harness.pump()
    state = harness.order(order_id)
    assert state is not None
    assert state.phase is Phase.CHARGED


def failure(envelope: Envelope) -> PaymentRefundFailed:
    assert isinstance(envelope.data, PaymentRefundFailed)
    return envelope.data


# --- fails twice, then succeeds -----------------------------------------------------------------


def test_a_refund_that_fails_twice_is_retried_with_growing_waits_then_refunded_once() -> None:
    # Given a charged order and a provider that fails the first two attempts
    provider = FlakyRefunds(failures=2)
    harness = Harness(refunds=provider)
    charged_order(harness)
    trigger = shipping_failed("o-1", "no carrier to AQ")

    # When shipping fails
    first = harness.publish(trigger)

    # Then the first attempt fails visibly, no credit moves, and the order waits a second to retry
    [failed_1] = payment_events(first)
    assert failed_1.data == PaymentRefundFailed(
        customer_id=ALICE,
        amount=Decimal("40.00"),
        currency="EUR",
        attempt=1,
        reason=PROVIDER_UNAVAILABLE,
        retry_at=T0 + SECOND,
    )
    assert failed_1.causation_id == trigger.event_id
    assert failed_1.event_id == trigger.caused(failed_1.data, Source.PAYMENT).event_id
    assert ledger_requests(first) == []
    state = harness.order("o-1")
    assert state is not None
    assert state.phase is Phase.REFUND_PENDING
    assert state.refund_retry is not None
    assert (state.refund_retry.failed_attempts, state.refund_retry.next_attempt_at) == (1, T0 + SECOND)
    assert state.refund_retry.reason == "shipping failed: no carrier to AQ"

    # When time passes, but not up to the retry
    # Then nothing happens
    assert harness.tick(T0 + SECOND / 2) == []
    assert len(provider.attempts) == 1

    # When the retry is due, the second attempt fails too, and the wait doubles
    [failed_2] = payment_events(harness.tick(T0 + SECOND))
    assert failure(failed_2).attempt == 2
    assert failure(failed_2).retry_at == T0 + 3 * SECOND
    assert failed_2.causation_id == trigger.event_id
    assert failed_2.event_id == refund_failure_id(trigger.event_id, 2)
    assert failed_2.occurred_at == T0 + SECOND
    assert harness.tick(T0 + 2 * SECOND) == []

    # When the third attempt is due, it succeeds
    third = harness.tick(T0 + 3 * SECOND)

    # Then the refund proceeds exactly as without an outage: the ledger refunds, PaymentRefunded follows
    assert ledger_requests(third) == [
        LedgerRequest(operation=LedgerOperation.REFUND, customer_id=ALICE, order_id="o-1", amount=Decimal("40.00"))
    ]
    [refunded] = payment_events(third)
    assert refunded.data == PaymentRefunded(
        customer_id=ALICE, amount=Decimal("40.00"), currency="EUR", reason="shipping failed: no carrier to AQ"
    )
    assert refunded.causation_id == trigger.event_id
    assert refunded.event_id == trigger.caused(refunded.data, Source.PAYMENT).event_id
    assert [at for *_, at in provider.attempts] == [T0, T0 + SECOND, T0 + 3 * SECOND]
    harness.pump()
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert (ledger.used, ledger.charged_total, ledger.refunded_total, ledger.holds) == (
        Decimal(0),
        Decimal("40.00"),
        Decimal("40.00"),
        {},
    )
    state = harness.order("o-1")
    assert state is not None
    assert (state.phase, state.closed_reason) == (Phase.REFUNDED, "shipping failed: no carrier to AQ")
    assert state.refund_retry is not None
    assert state.refund_retry.failed_attempts == 2
    # The first failure and the refund are recorded under the trigger, so its redelivery re-emits them
    assert state.handled[str(trigger.event_id)] == [e.model_dump_json() for e in (failed_1, refunded)]
    assert [e.type for e in harness.events("o-1")] == [
        "PaymentCharged",
        "PaymentRefundFailed",
        "PaymentRefundFailed",
        "PaymentRefunded",
    ]

    # And no later tick refunds again
    assert harness.tick(T0 + timedelta(hours=1)) == []
    assert len(provider.attempts) == 3


@pytest.mark.parametrize("trigger", [approval_denied, approval_timed_out, shipping_failed, shipment_cancelled])
def test_every_compensation_trigger_retries_a_failed_refund(trigger: Callable[[str], Envelope]) -> None:
    harness = Harness(refunds=FlakyRefunds(failures=1))
    charged_order(harness)

    assert [e.type for e in payment_events(harness.publish(trigger("o-1")))] == ["PaymentRefundFailed"]
    assert [e.type for e in payment_events(harness.tick(T0 + SECOND))] == ["PaymentRefunded"]


def test_a_refund_that_succeeds_at_once_emits_no_failure_and_needs_no_retry() -> None:
    harness = Harness(refunds=FlakyRefunds(failures=0))
    charged_order(harness)

    emitted = harness.publish(approval_denied("o-1"))

    assert [e.type for e in payment_events(emitted)] == ["PaymentRefunded"]
    assert len(ledger_requests(emitted)) == 1
    state = harness.order("o-1")
    assert state is not None
    assert (state.phase, state.refund_retry) == (Phase.REFUNDED, None)
    assert harness.stores[harness.partition_of("o-1")].get(REFUND_RETRIES_KEY, RefundRetryIndex) is None


# --- duplicates and concurrent triggers ----------------------------------------------------------


def test_a_duplicate_trigger_while_pending_re_emits_the_same_failure_and_attempts_nothing() -> None:
    provider = FlakyRefunds(failures=5)
    harness = Harness(refunds=provider)
    charged_order(harness)
    trigger = shipping_failed("o-1")
    [failed] = harness.publish(trigger)
    before = harness.order("o-1")

    again = harness.publish(trigger)

    assert [out.raw for out in again] == [failed.raw]
    assert len(provider.attempts) == 1
    assert harness.order("o-1") == before


def test_a_cancellation_while_a_refund_is_pending_starts_no_second_refund() -> None:
    provider = FlakyRefunds(failures=1)
    harness = Harness(refunds=provider)
    charged_order(harness)
    harness.publish(shipping_failed("o-1", "no carrier"))

    assert harness.publish(shipment_cancelled("o-1", "too slow")) == []
    assert harness.publish(approval_denied("o-1")) == []
    assert len(provider.attempts) == 1

    [refunded] = payment_events(harness.tick(T0 + SECOND))
    assert isinstance(refunded.data, PaymentRefunded)
    assert refunded.data.reason == "shipping failed: no carrier"
    harness.pump()
    assert [r.operation for r in harness.requests("o-1")] == [LedgerOperation.HOLD, LedgerOperation.REFUND]
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert ledger.refunded_total == Decimal("40.00")


def test_a_trigger_redelivered_after_the_refund_re_emits_the_first_failure_and_the_refund_and_refunds_once() -> None:
    harness = Harness(refunds=FlakyRefunds(failures=2))
    charged_order(harness)
    trigger = approval_denied("o-1")
    first = harness.publish(trigger)
    harness.tick(T0 + SECOND)
    last = harness.tick(T0 + 3 * SECOND)
    harness.pump()

    again = harness.publish(trigger)

    assert [out.raw for out in again] == [out.raw for out in first + last if out.topic == PAYMENT_EVENTS]
    assert ledger_requests(again) == []
    harness.pump()
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert ledger.refunded_total == Decimal("40.00")


def test_a_retry_made_again_after_a_lost_commit_gets_the_same_event_id() -> None:
    # Given a refund pending, whose second attempt ran but whose commit was lost (the task restarted)
    harness = Harness(refunds=FlakyRefunds(failures=3))
    charged_order(harness)
    harness.publish(shipping_failed("o-1"))
    partition = harness.partition_of("o-1")
    committed = copy.deepcopy(harness.stores[partition])
    [lost] = payment_events(harness.tick(T0 + SECOND))
    harness.stores[partition] = committed
    harness.restart()

    # When the attempt is made again, a little later
    [redone] = payment_events(harness.tick(T0 + 1.5 * SECOND))

    # Then consumers see the same event (they deduplicate on its id)
    assert redone.event_id == lost.event_id
    assert failure(redone).attempt == failure(lost).attempt == 2


# --- backoff ------------------------------------------------------------------------------------


def test_the_wait_doubles_up_to_the_maximum() -> None:
    harness = Harness(
        refunds=FlakyRefunds(failures=6), backoff=RefundBackoff(initial=SECOND, maximum=timedelta(seconds=5))
    )
    charged_order(harness)
    waits: list[timedelta] = []
    outs = harness.publish(shipping_failed("o-1"))
    while not any(isinstance(e.data, PaymentRefunded) for e in payment_events(outs)):
        [event] = payment_events(outs)
        retry_at = failure(event).retry_at
        waits.append(retry_at - harness.now)
        outs = harness.tick(retry_at)

    assert waits == [timedelta(seconds=s) for s in (1, 2, 4, 5, 5, 5)]


def test_backoff_rules() -> None:
    backoff = RefundBackoff(initial=timedelta(milliseconds=200), maximum=timedelta(seconds=30))
    assert [backoff.delay(n).total_seconds() for n in (1, 2, 3, 4)] == [0.2, 0.4, 0.8, 1.6]
    assert backoff.delay(10_000) == timedelta(seconds=30)
    with pytest.raises(ValueError, match="initial <= maximum"):
        RefundBackoff(initial=timedelta(0))
    with pytest.raises(ValueError, match="initial <= maximum"):
        RefundBackoff(initial=timedelta(seconds=2), maximum=SECOND)


# --- the providers ------------------------------------------------------------------------------


def window(start: datetime, end: datetime) -> OutageWindow:
    return OutageWindow(start=start, end=end)


def test_scheduled_outages_fail_inside_a_window_only() -> None:
    outages = ScheduledOutages((window(T0, T0 + SECOND), window(T0 + 10 * SECOND, T0 + 20 * SECOND)))

    def attempt(at: datetime) -> RefundFailure | None:
        return outages.refund("o-1", Decimal("1.00"), "EUR", at)

    assert attempt(T0 - SECOND) is None
    assert attempt(T0) == RefundFailure(PROVIDER_UNAVAILABLE)
    assert attempt(T0 + SECOND / 2) == RefundFailure(PROVIDER_UNAVAILABLE)
    assert attempt(T0 + SECOND) is None  # the end is excluded
    assert attempt(T0 + 15 * SECOND) == RefundFailure(PROVIDER_UNAVAILABLE)
    assert attempt(T0 + 20 * SECOND) is None
    assert LedgerRefunds().refund("o-1", Decimal("1.00"), "EUR", T0) is None


def test_an_outage_window_must_end_after_it_starts_and_name_its_offset() -> None:
    with pytest.raises(ValidationError, match="must end after it starts"):
        window(T0, T0)
    with pytest.raises(ValidationError, match="timezone"):
        OutageWindow.model_validate({"start": "2030-01-01T00:00:00", "end": "2030-01-01T00:01:00"})


# --- settings and wiring ------------------------------------------------------------------------


def outages_json(*windows: tuple[datetime, datetime]) -> str:
    return json.dumps([{"start": start.isoformat(), "end": end.isoformat()} for start, end in windows])


def test_refund_settings_default_to_a_provider_that_never_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHOREO_PAYMENT_REFUND_OUTAGES", raising=False)
    settings = PaymentSettings(_env_file=None)
    assert settings.payment_refund_outages == []
    assert (settings.payment_refund_retry_initial, settings.payment_refund_retry_max) == (
        SECOND,
        timedelta(seconds=30),
    )
    assert isinstance(refund_provider(settings), LedgerRefunds)
    app = build_app(settings)
    assert isinstance(app.refunds, LedgerRefunds)
    assert app.backoff == RefundBackoff(initial=SECOND, maximum=timedelta(seconds=30))


def test_refund_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CHOREO_PAYMENT_REFUND_OUTAGES",
        '[{"start": "2030-06-01T12:00:00Z", "end": "2030-06-01T12:00:30Z"}, '
        '{"start": "2030-06-01T14:00:00+02:00", "end": "2030-06-01T14:05:00+02:00"}]',
    )
    monkeypatch.setenv("CHOREO_PAYMENT_REFUND_RETRY_INITIAL", "0.25")
    monkeypatch.setenv("CHOREO_PAYMENT_REFUND_RETRY_MAX", "PT10S")

    settings = PaymentSettings()
    app = build_app(settings)

    assert settings.payment_refund_outages == [
        window(T0, T0 + 30 * SECOND),
        window(T0, T0 + timedelta(minutes=5)),
    ]
    assert isinstance(app.refunds, ScheduledOutages)
    assert app.refunds.refund("o-1", Decimal("1.00"), "EUR", T0 + 4 * timedelta(minutes=1)) is not None
    assert app.backoff == RefundBackoff(initial=timedelta(seconds=0.25), maximum=timedelta(seconds=10))


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"CHOREO_PAYMENT_REFUND_OUTAGES": "not json"}, "payment_refund_outages"),
        ({"CHOREO_PAYMENT_REFUND_OUTAGES": outages_json((T0, T0 - SECOND))}, "must end after it starts"),
        ({"CHOREO_PAYMENT_REFUND_OUTAGES": '[{"start": "2030-06-01T12:00:00Z"}]'}, "end"),
        ({"CHOREO_PAYMENT_REFUND_RETRY_INITIAL": "0"}, "payment_refund_retry_initial must be positive"),
        (
            {"CHOREO_PAYMENT_REFUND_RETRY_INITIAL": "5", "CHOREO_PAYMENT_REFUND_RETRY_MAX": "1"},
            "must not be shorter",
        ),
    ],
)
def test_bad_refund_settings_are_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises((ValidationError, ValueError), match=message):
        PaymentSettings()


def test_the_configured_outage_fails_refunds_and_a_restarted_instance_resumes_the_retries() -> None:
    # Given payment with the provider its settings select: down for the first 30 seconds
    settings = PaymentSettings(
        _env_file=None,
        payment_refund_outages=[window(T0 - SECOND, T0 + 30 * SECOND)],
    )
    harness = Harness(refunds=refund_provider(settings))
    charged_order(harness)

    # When an approval is denied during the outage
    [failed] = payment_events(harness.publish(approval_denied("o-1")))
    assert failure(failed).reason == PROVIDER_UNAVAILABLE

    # Then a new instance (the same committed state) keeps retrying until the outage ends, and refunds once
    harness.restart()
    types: list[str] = []
    while "PaymentRefunded" not in types:
        state = harness.order("o-1")
        assert state is not None
        assert state.refund_retry is not None
        types = [e.type for e in payment_events(harness.tick(state.refund_retry.next_attempt_at))]
        assert types in (["PaymentRefundFailed"], ["PaymentRefunded"])
    assert harness.now >= T0 + 30 * SECOND
    attempts = [failure(e).attempt for e in harness.events("o-1") if isinstance(e.data, PaymentRefundFailed)]
    assert attempts == list(range(1, len(attempts) + 1))
    assert len(attempts) == 5  # failed at 0, 1, 3, 7 and 15 s; the attempt at 31 s succeeds
    harness.pump()
    ledger = harness.ledger(ALICE)
    assert ledger is not None
    assert ledger.refunded_total == Decimal("40.00")


def test_index_keeps_only_pending_orders() -> None:
    harness = Harness(refunds=FlakyRefunds(per_order={"o-1": 1, "o-2": 0}))
    charged_order(harness, "o-1")
    charged_order(harness, "o-2")
    harness.publish(approval_denied("o-1"))
    harness.publish(approval_denied("o-2"))
    partition = harness.partition_of("o-1")

    index = harness.stores[partition].get(REFUND_RETRIES_KEY, RefundRetryIndex)
    assert index is not None
    assert index.orders == {"o-1": T0 + SECOND}

    harness.tick(T0 + SECOND)
    index = harness.stores[partition].get(REFUND_RETRIES_KEY, RefundRetryIndex)
    assert index == RefundRetryIndex()
    assert uuid.UUID(str(harness.events("o-1")[-1].event_id))


def test_a_long_outage_does_not_grow_the_order_state() -> None:
    harness = Harness(refunds=FlakyRefunds(failures=200), backoff=RefundBackoff(initial=SECOND, maximum=SECOND))
    charged_order(harness)
    harness.publish(shipping_failed("o-1"))
    harness.tick(T0 + SECOND)
    after_two = harness.order("o-1")
    assert after_two is not None
    size_after_two = len(after_two.model_dump_json())

    for second in range(2, 150):
        harness.tick(T0 + second * SECOND)

    state = harness.order("o-1")
    assert state is not None
    assert state.refund_retry is not None
    assert state.refund_retry.failed_attempts == 150
    assert len(state.model_dump_json()) <= size_after_two + 10

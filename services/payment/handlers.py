"""Pure reactions of the payment service: saga events, refund retries and ledger replies (order stage), ledger
requests."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from functools import partial
from typing import TypeVar

from schemas.envelope import Envelope
from schemas.events import (
    ApprovalDenied,
    ApprovalTimedOut,
    Event,
    InventoryReserved,
    OrderCompleted,
    OrderDetails,
    PaymentCharged,
    PaymentDeclined,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentVoided,
    ShipmentCancelled,
    ShippingFailed,
)
from schemas.topics import LEDGER_REQUESTS
from services.common.saga import Handler, Reaction, Request, payload
from services.payment.domain import (
    CustomerLedger,
    LedgerChange,
    LedgerOperation,
    LedgerReply,
    LedgerRequest,
    PaymentOrder,
    Phase,
    RefundRetry,
    Settlement,
    text,
)
from services.payment.refunds import RefundAttempt

E = TypeVar("E", bound=Event)


def _bill(state: PaymentOrder) -> tuple[OrderDetails, Decimal]:
    if state.order is None or state.amount is None:
        raise ValueError(f"order {state.order_id!r} has no charge details in phase {state.phase}")
    return state.order, state.amount


def _ledger(operation: LedgerOperation, state: PaymentOrder) -> Request:
    order, amount = _bill(state)
    body = LedgerRequest(operation=operation, customer_id=order.customer_id, order_id=state.order_id, amount=amount)
    return Request(LEDGER_REQUESTS, order.customer_id, body)


# --- order stage --------------------------------------------------------------------------------


def on_inventory_reserved(state: PaymentOrder, envelope: Envelope) -> Reaction[PaymentOrder]:
    # Only a fresh order starts a charge: a cancelled one never does, and one charge per order.
    if state.phase is not Phase.AWAITING:
        return Reaction(state)
    order = payload(envelope, InventoryReserved).order
    holding = state.model_copy(
        update={
            "phase": Phase.HOLDING,
            "order": order,
            "amount": order.total,
            "trigger_id": str(envelope.event_id),
            "hold_pending": True,
        }
    )
    return Reaction(holding, requests=(_ledger(LedgerOperation.HOLD, holding),))


def compensate(state: PaymentOrder, reason: str, trigger: Envelope, attempt: RefundAttempt) -> Reaction[PaymentOrder]:
    """Undo the payment step for a later step's failure or a cancellation."""
    if state.completed:
        return Reaction(state)  # the order completed: its charge stands for good
    if state.phase is Phase.CHARGED:
        return attempt_refund(state, attempt, reason=reason, trigger_id=str(trigger.event_id), failed_before=0)
    if state.phase in (Phase.AWAITING, Phase.HOLDING):
        # A hold still in flight stays pending: its reply releases it instead of charging.
        voided = state.model_copy(update={"phase": Phase.VOIDED, "closed_reason": reason})
        return Reaction(voided, events=(PaymentVoided(reason=reason),))
    # Refunded, declined, voided, or a refund already pending (its retries finish it): nothing more to undo.
    return Reaction(state)


def attempt_refund(
    state: PaymentOrder, attempt: RefundAttempt, *, reason: str, trigger_id: str, failed_before: int
) -> Reaction[PaymentOrder]:
    """Ask the provider for the money back; on success refund the ledger, else stay pending and say when to retry."""
    order, amount = _bill(state)
    failure = attempt.provider.refund(state.order_id, amount, order.currency, attempt.now)
    if failure is None:
        refunded = state.model_copy(update={"phase": Phase.REFUNDED, "closed_reason": reason})
        done = PaymentRefunded(customer_id=order.customer_id, amount=amount, currency=order.currency, reason=reason)
        return Reaction(refunded, events=(done,), requests=(_ledger(LedgerOperation.REFUND, state),))
    failed = failed_before + 1
    retry_at = attempt.now + attempt.backoff.delay(failed)
    retry = RefundRetry(trigger_id=trigger_id, reason=reason, failed_attempts=failed, next_attempt_at=retry_at)
    pending = state.model_copy(update={"phase": Phase.REFUND_PENDING, "refund_retry": retry})
    failure_event = PaymentRefundFailed(
        customer_id=order.customer_id,
        amount=amount,
        currency=order.currency,
        attempt=failed,
        reason=text(failure.reason),
        retry_at=retry_at,
    )
    return Reaction(pending, events=(failure_event,))


def retry_refund(state: PaymentOrder, attempt: RefundAttempt) -> Reaction[PaymentOrder]:
    """The next attempt of a pending refund, once its time has come."""
    retry = state.refund_retry
    if state.phase is not Phase.REFUND_PENDING or retry is None or attempt.now < retry.next_attempt_at:
        return Reaction(state)
    return attempt_refund(
        state, attempt, reason=retry.reason, trigger_id=retry.trigger_id, failed_before=retry.failed_attempts
    )


def on_approval_denied(attempt: RefundAttempt, state: PaymentOrder, envelope: Envelope) -> Reaction[PaymentOrder]:
    payload(envelope, ApprovalDenied)
    return compensate(state, "approval denied", envelope, attempt)


def on_approval_timed_out(attempt: RefundAttempt, state: PaymentOrder, envelope: Envelope) -> Reaction[PaymentOrder]:
    payload(envelope, ApprovalTimedOut)
    return compensate(state, "approval timed out", envelope, attempt)


def on_shipping_failed(attempt: RefundAttempt, state: PaymentOrder, envelope: Envelope) -> Reaction[PaymentOrder]:
    reason = text(f"shipping failed: {payload(envelope, ShippingFailed).reason}")
    return compensate(state, reason, envelope, attempt)


def on_shipment_cancelled(attempt: RefundAttempt, state: PaymentOrder, envelope: Envelope) -> Reaction[PaymentOrder]:
    reason = text(f"order cancelled: {payload(envelope, ShipmentCancelled).reason}")
    return compensate(state, reason, envelope, attempt)


def on_order_completed(state: PaymentOrder, envelope: Envelope) -> Reaction[PaymentOrder]:
    """The charge stands for good: nothing can ask for it back, so the order is finished here, and its
    hold leaves the customer's ledger."""
    payload(envelope, OrderCompleted)
    if state.phase is not Phase.CHARGED or state.completed:
        return Reaction(state)
    return Reaction(state.model_copy(update={"completed": True}), requests=(_ledger(LedgerOperation.FINALIZE, state),))


def order_handlers(attempt: RefundAttempt) -> Mapping[type[Event], Handler[PaymentOrder]]:
    """The saga events the order stage reacts to; a compensation makes its first refund attempt with `attempt`."""
    return {
        InventoryReserved: on_inventory_reserved,
        ApprovalDenied: partial(on_approval_denied, attempt),
        ApprovalTimedOut: partial(on_approval_timed_out, attempt),
        ShippingFailed: partial(on_shipping_failed, attempt),
        ShipmentCancelled: partial(on_shipment_cancelled, attempt),
        OrderCompleted: on_order_completed,
    }


def on_ledger_reply(state: PaymentOrder, reply: LedgerReply) -> Reaction[PaymentOrder]:
    """The ledger answered the hold: charge, decline, or release it if the order was cancelled meanwhile."""
    if not state.hold_pending:
        return Reaction(state)
    answered = state.model_copy(update={"hold_pending": False})
    if state.phase is Phase.VOIDED:
        return Reaction(answered, requests=(_ledger(LedgerOperation.RELEASE, state),) if reply.held else ())
    order, amount = _bill(state)
    currency = order.currency
    if reply.held:
        charged = PaymentCharged(order=order, amount=amount, currency=currency)
        return Reaction(answered.model_copy(update={"phase": Phase.CHARGED}), events=(charged,))
    reason = text(reply.reason or "declined by the ledger")
    declined = PaymentDeclined(customer_id=order.customer_id, amount=amount, currency=currency, reason=reason)
    return Reaction(answered.model_copy(update={"phase": Phase.DECLINED, "closed_reason": reason}), events=(declined,))


# --- ledger stage -------------------------------------------------------------------------------


def on_ledger_request(ledger: CustomerLedger, request: LedgerRequest, past: Settlement | None) -> LedgerChange:
    """Apply one request to the customer's credit; only a hold is answered. `past` is how the order's
    earlier hold ended, if one did."""
    if request.operation is LedgerOperation.HOLD:
        return ledger.hold(request.order_id, request.amount, past)
    if request.operation is LedgerOperation.RELEASE:
        return ledger.release(request.order_id)
    if request.operation is LedgerOperation.FINALIZE:
        return ledger.finalize(request.order_id)
    return ledger.refund(request.order_id)

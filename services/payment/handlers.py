"""Pure reactions of the payment service: saga events and ledger replies (order stage), ledger requests."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import TypeVar

from schemas.envelope import Envelope
from schemas.events import (
    ApprovalDenied,
    ApprovalTimedOut,
    Event,
    InventoryReserved,
    OrderDetails,
    PaymentCharged,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    ShipmentCancelled,
    ShippingFailed,
)
from schemas.topics import LEDGER_REQUESTS
from services.common.saga import Handler, Reaction, Request, payload
from services.payment.domain import (
    CustomerLedger,
    LedgerOperation,
    LedgerReply,
    LedgerRequest,
    PaymentOrder,
    Phase,
    text,
)

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


def compensate(state: PaymentOrder, reason: str) -> Reaction[PaymentOrder]:
    """Undo the payment step for a later step's failure or a cancellation."""
    if state.phase is Phase.CHARGED:
        order, amount = _bill(state)
        refunded = state.model_copy(update={"phase": Phase.REFUNDED, "closed_reason": reason})
        event = PaymentRefunded(customer_id=order.customer_id, amount=amount, currency=order.currency, reason=reason)
        return Reaction(refunded, events=(event,), requests=(_ledger(LedgerOperation.REFUND, state),))
    if state.phase in (Phase.AWAITING, Phase.HOLDING):
        # A hold still in flight stays pending: its reply releases it instead of charging.
        voided = state.model_copy(update={"phase": Phase.VOIDED, "closed_reason": reason})
        return Reaction(voided, events=(PaymentVoided(reason=reason),))
    return Reaction(state)


def on_approval_denied(state: PaymentOrder, envelope: Envelope) -> Reaction[PaymentOrder]:
    payload(envelope, ApprovalDenied)
    return compensate(state, "approval denied")


def on_approval_timed_out(state: PaymentOrder, envelope: Envelope) -> Reaction[PaymentOrder]:
    payload(envelope, ApprovalTimedOut)
    return compensate(state, "approval timed out")


def on_shipping_failed(state: PaymentOrder, envelope: Envelope) -> Reaction[PaymentOrder]:
    return compensate(state, text(f"shipping failed: {payload(envelope, ShippingFailed).reason}"))


def on_shipment_cancelled(state: PaymentOrder, envelope: Envelope) -> Reaction[PaymentOrder]:
    return compensate(state, text(f"order cancelled: {payload(envelope, ShipmentCancelled).reason}"))


ORDER_HANDLERS: Mapping[type[Event], Handler[PaymentOrder]] = {
    InventoryReserved: on_inventory_reserved,
    ApprovalDenied: on_approval_denied,
    ApprovalTimedOut: on_approval_timed_out,
    ShippingFailed: on_shipping_failed,
    ShipmentCancelled: on_shipment_cancelled,
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


def on_ledger_request(ledger: CustomerLedger, request: LedgerRequest) -> tuple[CustomerLedger, LedgerReply | None]:
    """Apply one request to the customer's credit; only a hold is answered."""
    if request.operation is LedgerOperation.HOLD:
        return ledger.hold(request.order_id, request.amount)
    if request.operation is LedgerOperation.RELEASE:
        return ledger.release(request.order_id), None
    return ledger.refund(request.order_id), None

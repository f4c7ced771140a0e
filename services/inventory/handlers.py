"""Inventory's reactions, as pure functions of (state, message).

Order stage: OrderPlaced starts a reservation (one hold per SKU); the replies settle it
all-or-nothing; PaymentDeclined / PaymentRefunded / PaymentVoided compensate; OrderCompleted ships.
SKU stage: hold, release and commit applied to one SKU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from schemas.envelope import Envelope
from schemas.events import (
    Event,
    InventoryRejected,
    InventoryReleased,
    InventoryReserved,
    OrderCancelled,
    OrderCompleted,
    OrderDetails,
    OrderPlaced,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    Shortage,
)
from schemas.topics import STOCK_REQUESTS
from services.common.saga import Handler, Reaction, Request, payload
from services.inventory.domain import (
    Cancellation,
    InventoryOrder,
    OrderStatus,
    SkuStock,
    StockOperation,
    StockReply,
    StockRequest,
    fit,
    shortage_reason,
)

E = TypeVar("E", bound=Event)
OrderReaction = Reaction[InventoryOrder]


def _ask(operation: StockOperation, order_id: str, sku: str, quantity: int | None = None) -> Request:
    body = StockRequest(operation=operation, sku=sku, order_id=order_id, quantity=quantity)
    return Request(STOCK_REQUESTS, sku, body)


def _release_all(state: InventoryOrder) -> tuple[Request, ...]:
    return tuple(_ask(StockOperation.RELEASE, state.order_id, sku) for sku in sorted(state.held))


# --- order stage: saga events ---------------------------------------------------------------------------


def order_placed(state: InventoryOrder, envelope: Envelope) -> OrderReaction:
    if state.status is not OrderStatus.NEW:
        # Either cancelled before the order was seen (a late OrderPlaced is ignored) or already under way.
        return Reaction(state)
    placed = payload(envelope, OrderPlaced)
    order = OrderDetails(**{name: getattr(placed, name) for name in OrderDetails.model_fields})
    wanted = order.quantities()
    return Reaction(
        state.model_copy(
            update={
                "status": OrderStatus.RESERVING,
                "order": order,
                "trigger_id": str(envelope.event_id),
                "awaiting": wanted,
            }
        ),
        requests=tuple(_ask(StockOperation.HOLD, state.order_id, sku, qty) for sku, qty in sorted(wanted.items())),
    )


def payment_declined(state: InventoryOrder, envelope: Envelope) -> OrderReaction:
    return _cancel(state, envelope, f"payment declined: {payload(envelope, PaymentDeclined).reason}")


def payment_refunded(state: InventoryOrder, envelope: Envelope) -> OrderReaction:
    return _cancel(state, envelope, f"payment refunded: {payload(envelope, PaymentRefunded).reason}")


def payment_voided(state: InventoryOrder, envelope: Envelope) -> OrderReaction:
    return _cancel(state, envelope, f"cancelled: {payload(envelope, PaymentVoided).reason}")


def _cancel(state: InventoryOrder, envelope: Envelope, reason: str) -> OrderReaction:
    reason = fit(reason)
    if state.status is OrderStatus.NEW:
        closed = state.model_copy(update={"status": OrderStatus.CANCELLED})
        return Reaction(closed, events=(OrderCancelled(reason=reason),))
    if state.status is OrderStatus.RESERVING and state.cancellation is None:
        # The reservation was never announced, so there is nothing public to compensate: the order
        # ends now, and the holds still in flight are given back quietly as their replies arrive.
        pending = Cancellation(reason=reason, trigger_id=str(envelope.event_id))
        return Reaction(state.model_copy(update={"cancellation": pending}), events=(OrderCancelled(reason=reason),))
    if state.status is OrderStatus.RESERVED:
        return Reaction(
            state.model_copy(update={"status": OrderStatus.RELEASED}),
            events=(InventoryReleased(items=state.stock_lines(), reason=reason), OrderCancelled(reason=reason)),
            requests=_release_all(state),
        )
    return Reaction(state)  # already closed, or a cancellation is already pending


def order_completed(state: InventoryOrder, envelope: Envelope) -> OrderReaction:
    payload(envelope, OrderCompleted)
    if state.status is not OrderStatus.RESERVED:
        # Shipping completes only orders whose reservation we announced, so this is a repeat: nothing to move.
        return Reaction(state)
    return Reaction(
        state.model_copy(update={"status": OrderStatus.SHIPPED}),
        requests=tuple(_ask(StockOperation.COMMIT, state.order_id, sku) for sku in sorted(state.held)),
    )


SAGA_HANDLERS: dict[type[Event], Handler[InventoryOrder]] = {
    OrderPlaced: order_placed,
    PaymentDeclined: payment_declined,
    PaymentRefunded: payment_refunded,
    PaymentVoided: payment_voided,
    OrderCompleted: order_completed,
}


# --- order stage: replies from the SKUs -------------------------------------------------------------------


@dataclass(frozen=True)
class Settled:
    """The reaction to a reply; `cause` is the event_id of the saga event its events answer."""

    reaction: OrderReaction
    cause: str | None = None


def stock_replied(state: InventoryOrder, reply: StockReply) -> Settled:
    if reply.sku not in state.awaiting:
        if reply.held and reply.sku not in state.held:
            # A hold this order does not account for would be stranded: give it back.
            return Settled(Reaction(state, requests=(_ask(StockOperation.RELEASE, state.order_id, reply.sku),)))
        return Settled(Reaction(state))
    update: dict[str, object] = {"awaiting": {s: q for s, q in state.awaiting.items() if s != reply.sku}}
    if reply.held:
        update["held"] = {**state.held, reply.sku: reply.requested}
    else:
        shortage = Shortage(sku=reply.sku, requested=reply.requested, available=reply.available)
        update["shortages"] = [*state.shortages, shortage]
    state = state.model_copy(update=update)
    return _settle(state) if not state.awaiting else Settled(Reaction(state))


def _settle(state: InventoryOrder) -> Settled:
    """Every SKU answered: reserved, rejected, or cancelled meanwhile."""
    if state.cancellation is not None:
        # OrderCancelled went out when the cancellation arrived; only the holds remain to give back.
        return Settled(
            Reaction(state.model_copy(update={"status": OrderStatus.CANCELLED}), requests=_release_all(state)),
            cause=state.cancellation.trigger_id,
        )
    if state.shortages:
        why = shortage_reason(sorted(state.shortages, key=lambda s: s.sku))
        rejected = InventoryRejected(reason=why, shortages=sorted(state.shortages, key=lambda s: s.sku))
        return Settled(
            Reaction(
                state.model_copy(update={"status": OrderStatus.REJECTED}),
                events=(rejected, OrderCancelled(reason=fit(f"inventory rejected: {why}"))),
                requests=_release_all(state),
            ),
            cause=state.trigger_id,
        )
    assert state.order is not None
    return Settled(
        Reaction(
            state.model_copy(update={"status": OrderStatus.RESERVED}),
            events=(InventoryReserved(order=state.order),),
        ),
        cause=state.trigger_id,
    )


# --- SKU stage ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StockChange:
    stock: SkuStock
    reply: StockReply | None = None


def stock_requested(stock: SkuStock, request: StockRequest) -> StockChange:
    if request.operation is StockOperation.RELEASE:
        return StockChange(stock.release(request.order_id))
    if request.operation is StockOperation.COMMIT:
        return StockChange(stock.commit(request.order_id))
    assert request.quantity is not None
    after, held = stock.hold(request.order_id, request.quantity)
    # A repeated hold answers with the quantity actually held, so the order stage records the truth.
    requested = after.holds.get(request.order_id, request.quantity)
    reply = StockReply(
        order_id=request.order_id, sku=request.sku, requested=requested, held=held, available=after.available
    )
    return StockChange(after, reply)

"""Shipping's reactions: pure functions `(state, envelope) -> Reaction`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import TypeVar

from schemas.envelope import Envelope
from schemas.events import (
    ApprovalGranted,
    Event,
    OrderCancellationRefused,
    OrderCancellationRequested,
    OrderCompleted,
    ShipmentCancelled,
    ShipmentScheduled,
    ShippingFailed,
)
from services.common.saga import Handler, Reaction, payload
from services.shipping.domain import (
    ORDER_ALREADY_COMPLETED,
    ShippingOrderState,
    ShippingPolicy,
    ShippingStatus,
    not_served_reason,
    shipment_id_for,
    shipped_items,
)

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)


def on_approval_granted(
    policy: ShippingPolicy, state: ShippingOrderState, envelope: Envelope
) -> Reaction[ShippingOrderState]:
    if state.status is not ShippingStatus.OPEN:
        # A cancelled order must never ship; a closed one was already answered.
        log.info("approval ignored", extra={"order_id": state.order_id, "status": state.status.value})
        return Reaction(state)
    order = payload(envelope, ApprovalGranted).order
    country = order.ship_to.country
    if not policy.serves(country):
        reason = not_served_reason(country)
        return Reaction(
            state.model_copy(update={"status": ShippingStatus.FAILED, "ship_to": country, "reason": reason}),
            events=(ShippingFailed(reason=reason),),
        )
    shipment_id = shipment_id_for(state.order_id)
    scheduled = ShipmentScheduled(shipment_id=shipment_id, carrier=policy.carrier, ship_to=country)
    completed = OrderCompleted(
        customer_id=order.customer_id, total=order.total, currency=order.currency, items=shipped_items(order)
    )
    update = {
        "status": ShippingStatus.COMPLETED,
        "shipment_id": shipment_id,
        "carrier": policy.carrier,
        "ship_to": country,
    }
    return Reaction(state.model_copy(update=update), events=(scheduled, completed))


def on_cancellation_requested(state: ShippingOrderState, envelope: Envelope) -> Reaction[ShippingOrderState]:
    if state.status is ShippingStatus.COMPLETED:
        return Reaction(state, events=(OrderCancellationRefused(reason=ORDER_ALREADY_COMPLETED),))
    if state.status is not ShippingStatus.OPEN:
        # Failed: compensation already runs from ShippingFailed. Cancelled: already answered.
        return Reaction(state)
    reason = payload(envelope, OrderCancellationRequested).reason
    return Reaction(
        state.model_copy(update={"status": ShippingStatus.CANCELLED, "reason": reason}),
        events=(ShipmentCancelled(had_shipment=False, reason=reason),),
    )


def handlers(policy: ShippingPolicy) -> Mapping[type[Event], Handler[ShippingOrderState]]:
    """Every event shipping reacts to; any other event on its inputs (OrderPlaced, other approval events) is ignored."""
    return {
        ApprovalGranted: partial(on_approval_granted, policy),
        OrderCancellationRequested: on_cancellation_requested,
    }

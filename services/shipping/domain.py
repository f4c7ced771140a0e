"""Shipping's rules: which destinations are served, what a booked shipment looks like, the order's state.

Shipping is the serialization point between completion and cancellation: an order is completed,
failed or cancelled here exactly once, whichever of ApprovalGranted and OrderCancellationRequested
arrives first. Scheduling a shipment and completing the order happen in one reaction, so there is
never a scheduled-but-not-completed shipment that a cancellation could still undo; that is why
ShipmentCancelled always carries `had_shipment: false` in this design.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum

from schemas.events import OrderDetails, StockLine
from services.common.saga import OrderState

# Shipment ids derive from the order id, so rebooking after a replay names the same shipment.
SHIPMENT_ID_NAMESPACE = uuid.UUID("2b7e5d0c-8f43-4a61-9c3e-5a1d7f0b6e92")

ORDER_ALREADY_COMPLETED = "order already completed"


class ShippingStatus(StrEnum):
    OPEN = "open"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ShippingOrderState(OrderState):
    status: ShippingStatus = ShippingStatus.OPEN
    shipment_id: str | None = None
    carrier: str | None = None
    ship_to: str | None = None
    reason: str | None = None
    """Why the order failed or was cancelled."""

    def finished(self) -> bool:
        return self.status is not ShippingStatus.OPEN


@dataclass(frozen=True)
class ShippingPolicy:
    countries: frozenset[str]
    carrier: str

    def serves(self, country: str) -> bool:
        return country in self.countries


def shipment_id_for(order_id: str) -> str:
    return str(uuid.uuid5(SHIPMENT_ID_NAMESPACE, order_id))


def not_served_reason(country: str) -> str:
    return f"destination country {country} is not served"


def shipped_items(order: OrderDetails) -> list[StockLine]:
    """One line per SKU with its total quantity, in the order the SKUs first appear."""
    return [StockLine(sku=sku, quantity=quantity) for sku, quantity in order.quantities().items()]

"""Every event type of the contract: the `data` payload of an envelope, named by its `type`.

Names are past-tense facts. Each payload carries what the next step of the saga needs
(event-carried state), so no service has to query another.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, ClassVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from schemas.primitives import CountryCode, CurrencyCode, CustomerId, Money, Quantity, Sku, Text

OptionalText = Annotated[str, StringConstraints(min_length=1, max_length=200)] | None


class ContractModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Event(ContractModel):
    """Base of every payload. `schema_version` is the newest version of the type this code understands."""

    schema_version: ClassVar[int] = 1


# --- value objects carried inside events -------------------------------------------------------


class OrderLine(ContractModel):
    sku: Sku
    quantity: Quantity
    unit_price: Money

    @property
    def subtotal(self) -> Decimal:
        return self.unit_price * self.quantity


class Address(ContractModel):
    country: CountryCode
    postal_code: OptionalText = None
    city: OptionalText = None
    line1: OptionalText = None


class OrderDetails(ContractModel):
    """What the client ordered, carried forward by each step that succeeds."""

    customer_id: CustomerId
    items: Annotated[list[OrderLine], Field(min_length=1, max_length=100)]
    currency: CurrencyCode
    ship_to: Address

    @property
    def total(self) -> Decimal:
        return sum((line.subtotal for line in self.items), Decimal(0))

    def quantities(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for line in self.items:
            totals[line.sku] = totals.get(line.sku, 0) + line.quantity
        return totals


class StockLine(ContractModel):
    sku: Sku
    quantity: Quantity


class Shortage(ContractModel):
    sku: Sku
    requested: Quantity
    available: Annotated[int, Field(ge=0)]


# --- client commands (topic `orders`) ---------------------------------------------------------


class OrderPlaced(OrderDetails, Event):
    """A customer placed an order."""


class OrderCancellationRequested(Event):
    """The customer asked to cancel an order that has not completed."""

    reason: Text


# --- inventory ----------------------------------------------------------------------------------


class InventoryReserved(Event):
    """Every line of the order is reserved."""

    order: OrderDetails


class InventoryRejected(Event):
    """At least one line could not be reserved; nothing is held for the order."""

    reason: Text
    shortages: list[Shortage] = []


class InventoryReleased(Event):
    """The order's reserved stock was returned to the available pool (a compensation)."""

    items: list[StockLine]
    reason: Text


# --- payment ------------------------------------------------------------------------------------


class PaymentCharged(Event):
    """The customer was charged the order total."""

    order: OrderDetails
    amount: Money
    currency: CurrencyCode


class PaymentDeclined(Event):
    """The charge was refused (for example, beyond the customer's available credit)."""

    customer_id: CustomerId
    amount: Money
    currency: CurrencyCode
    reason: Text


class PaymentRefunded(Event):
    """The charge was returned to the customer (a compensation)."""

    customer_id: CustomerId
    amount: Money
    currency: CurrencyCode
    reason: Text


class PaymentRefundFailed(Event):
    """A refund attempt failed at the refund provider; payment tries again at `retry_at`, until one succeeds."""

    customer_id: CustomerId
    amount: Money
    currency: CurrencyCode
    attempt: Annotated[int, Field(ge=1, description="1 for the first attempt, counting up with each retry")]
    reason: Text
    retry_at: AwareDatetime


class PaymentVoided(Event):
    """The order was cancelled before any charge: the payment step closes with nothing to refund."""

    reason: Text


# --- approval -----------------------------------------------------------------------------------


class ApprovalRequested(Event):
    """The order total is at or above the threshold: a reviewer must decide before the deadline."""

    order: OrderDetails
    amount: Money
    currency: CurrencyCode
    deadline: AwareDatetime


class ApprovalEscalated(Event):
    """A pending approval passed its escalation point without a decision."""

    deadline: AwareDatetime


class ApprovalDecisionSubmitted(Event):
    """A reviewer's decision, as submitted (topic `approval.decisions`); the approval service rules on it."""

    approved: bool
    reviewer: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    comment: Annotated[str, StringConstraints(max_length=1000)] | None = None


class ApprovalGranted(Event):
    """The order may ship: below the threshold, or a reviewer approved it."""

    order: OrderDetails
    reviewer: str
    reason: Text
    comment: str | None = None


class ApprovalDenied(Event):
    """A reviewer rejected the order."""

    reviewer: str
    comment: str | None = None


class ApprovalTimedOut(Event):
    """No decision arrived before the deadline."""

    deadline: datetime


class ApprovalDecisionIgnored(Event):
    """A decision arrived after the approval was already closed, and changed nothing."""

    decision_event_id: str
    reviewer: str
    reason: Text


# --- shipping -----------------------------------------------------------------------------------


class ShipmentScheduled(Event):
    """A carrier will pick the order up."""

    shipment_id: str
    carrier: str
    ship_to: Annotated[CountryCode, Field(description="Destination country")]


class ShippingFailed(Event):
    """The shipment could not be booked (for example, a destination not served)."""

    reason: Text


class ShipmentCancelled(Event):
    """The shipping step closed for a cancelled order; `had_shipment` says whether anything was booked."""

    had_shipment: bool
    reason: Text


# --- terminal and order-level outcomes ----------------------------------------------------------


class OrderCompleted(Event):
    """The saga finished: stock is shipped and the charge stands. Terminal."""

    customer_id: CustomerId
    total: Money
    currency: CurrencyCode
    items: list[StockLine]


class OrderCancelled(Event):
    """The saga ended without shipping; every completed step was compensated. Terminal."""

    reason: Text


class OrderCancellationRefused(Event):
    """A cancellation arrived after the order completed, so it changed nothing."""

    reason: Text


CommandType = Annotated[str, StringConstraints(min_length=1, max_length=64)] | None


class OrderCommandRejected(Event):
    """A client's record on a command topic failed validation and was dead-lettered; nothing acted on it.

    Written by the audit under the record's key, so a client watching its order sees why. The
    dead letter keeps the record whole; `partition` and `offset` say where it was read.
    """

    topic: str
    command_type: CommandType = Field(description="The record's `type`, when it had one.")
    reason: Text
    partition: Annotated[int, Field(ge=0)]
    offset: Annotated[int, Field(ge=0)]


# --- monitor (topic `monitor.alerts`; the key is the subject: `service:<name>` or the order id) -----


class ServiceDegraded(Event):
    """A service failed its health checks; the monitor now checks it more often."""

    service: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    reason: Text
    consecutive_failures: Annotated[int, Field(ge=1)]
    last_seen: AwareDatetime | None = None


class ServiceRecovered(Event):
    """A degraded service passed its health check again."""

    service: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    degraded_for_seconds: Annotated[float, Field(ge=0)]


class SagaStuck(Event):
    """An order has not reached a terminal event within the SLA. Raised once per order."""

    sla_seconds: Annotated[float, Field(gt=0)]
    open_for_seconds: Annotated[float, Field(ge=0)]
    last_event_type: str


def _all_event_types() -> dict[str, type[Event]]:
    found: dict[str, type[Event]] = {}
    pending: list[type[Event]] = list(Event.__subclasses__())
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return dict(sorted(found.items()))


EVENT_TYPES: dict[str, type[Event]] = _all_event_types()
TERMINAL_EVENTS: frozenset[type[Event]] = frozenset({OrderCompleted, OrderCancelled})
MONITOR_EVENTS: frozenset[type[Event]] = frozenset({ServiceDegraded, ServiceRecovered, SagaStuck})

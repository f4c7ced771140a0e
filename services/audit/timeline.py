"""Reading an order's audit trail as people do: a timeline, an outcome and a current state. Pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from schemas.envelope import Envelope
from schemas.events import (
    ApprovalDecisionIgnored,
    ApprovalDecisionSubmitted,
    ApprovalDenied,
    ApprovalEscalated,
    ApprovalGranted,
    ApprovalRequested,
    ApprovalTimedOut,
    Event,
    InventoryRejected,
    InventoryReleased,
    InventoryReserved,
    OrderCancellationRefused,
    OrderCancellationRequested,
    OrderCancelled,
    OrderCommandRejected,
    OrderCompleted,
    OrderLine,
    OrderPlaced,
    PaymentCharged,
    PaymentDeclined,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentVoided,
    ShipmentCancelled,
    ShipmentScheduled,
    ShippingFailed,
    StockLine,
)

PLACED = "placed"
RESERVED = "reserved"
CHARGED = "charged"
AWAITING_APPROVAL = "awaiting approval"
APPROVED = "approved"
SHIPMENT_SCHEDULED = "shipment scheduled"
CANCELLING = "cancelling"
COMPLETED = "completed"
CANCELLED = "cancelled"
REJECTED = "rejected"

TIMES = "\N{MULTIPLICATION SIGN}"  # between SKU and quantity

# The happy path, in the order the saga walks it; an order is as far as the furthest step it reached.
_FORWARD: dict[type[Event], tuple[int, str]] = {
    OrderPlaced: (1, PLACED),
    InventoryReserved: (2, RESERVED),
    PaymentCharged: (3, CHARGED),
    ApprovalRequested: (4, AWAITING_APPROVAL),
    ApprovalEscalated: (4, AWAITING_APPROVAL),
    ApprovalGranted: (5, APPROVED),
    ShipmentScheduled: (6, SHIPMENT_SCHEDULED),
}
# Failures and compensations: once one appears the order is being unwound.
_UNWINDING: dict[type[Event], str] = {
    InventoryRejected: "reservation rejected",
    PaymentDeclined: "payment declined",
    ApprovalDenied: "approval denied",
    ApprovalTimedOut: "approval timed out",
    ShippingFailed: "shipping failed",
    ShipmentCancelled: "shipment cancelled",
    PaymentRefundFailed: "refund retrying",
    PaymentRefunded: "payment refunded",
    PaymentVoided: "payment voided",
    InventoryReleased: "stock released",
}


@dataclass(frozen=True)
class OrderStatus:
    order_id: str
    state: str
    reason: str | None
    last_event: Envelope
    step: str | None = None
    cancellation_requested: bool = False
    cancellation_refused: str | None = None
    rejected: str | None = None
    """Why the latest of the client's commands that failed validation was refused."""

    @property
    def finished(self) -> bool:
        return self.state in (COMPLETED, CANCELLED)

    def describe(self) -> str:
        """One line, e.g. `cancelled: shipping failed: no carrier serves AQ` or `charged; cancellation requested`."""
        if self.state in (CANCELLED, REJECTED):
            text = f"{self.state}: {self.reason}" if self.reason else self.state
        elif self.state == CANCELLING:
            text = f"{CANCELLING} ({self.step})"
            if self.reason:
                text += f": {self.reason}"
        else:
            text = self.state
        # While unwinding, the reason already says why; elsewhere a pending request is worth showing.
        if self.cancellation_requested and self.state not in (COMPLETED, CANCELLED, CANCELLING):
            text += "; cancellation requested"
        if self.cancellation_refused is not None:
            text += f"; cancellation refused: {self.cancellation_refused}"
        if self.rejected is not None and self.state != REJECTED:
            text += f"; a command was rejected: {self.rejected}"
        return text


def order_status(envelopes: Sequence[Envelope]) -> OrderStatus:
    """The order's current state from its audit trail (in audit order); raises ValueError when empty."""
    if not envelopes:
        raise ValueError("an order's status needs at least one event")
    furthest = (0, PLACED)
    unwinding: str | None = None
    trigger: str | None = None
    terminal: Envelope | None = None
    requested = False
    refused: str | None = None
    rejected: str | None = None
    for envelope in envelopes:
        data = envelope.data
        kind = type(data)
        if isinstance(data, OrderCommandRejected):
            rejected = _rejection(data)
        elif kind in _FORWARD:
            furthest = max(furthest, _FORWARD[kind])
        elif kind in _UNWINDING:
            unwinding = _UNWINDING[kind]
            trigger = trigger or _reason_of(data)
        elif isinstance(data, OrderCompleted | OrderCancelled) and terminal is None:
            terminal = envelope
        elif isinstance(data, OrderCancellationRequested):
            requested = True
            trigger = trigger or f"cancellation requested: {data.reason}"
        elif isinstance(data, OrderCancellationRefused):
            refused = data.reason
    last = envelopes[-1]
    only_rejected = all(isinstance(envelope.data, OrderCommandRejected) for envelope in envelopes)
    state, reason, step = _standing(terminal, unwinding, trigger, furthest[1], rejected if only_rejected else None)
    return OrderStatus(
        order_id=last.order_id,
        state=state,
        reason=reason,
        last_event=last,
        step=step,
        cancellation_requested=requested,
        cancellation_refused=refused if state == COMPLETED else None,
        rejected=rejected,
    )


def _standing(
    terminal: Envelope | None, unwinding: str | None, trigger: str | None, furthest: str, rejected: str | None
) -> tuple[str, str | None, str | None]:
    """State, reason and step: the end if there is one, else the unwinding, else the furthest step."""
    if terminal is not None and isinstance(terminal.data, OrderCompleted):
        return COMPLETED, None, None
    if terminal is not None and isinstance(terminal.data, OrderCancelled):
        return CANCELLED, terminal.data.reason, None
    if unwinding is not None:
        return CANCELLING, trigger, unwinding
    if rejected is not None:
        return REJECTED, rejected, None
    return furthest, None, furthest


def timeline(envelopes: Sequence[Envelope]) -> str:
    """The order's events, one line each in audit (causal) order, then its outcome. No trailing newline."""
    if not envelopes:
        return ""
    lines = [f"order {envelopes[0].order_id}"]
    lines.extend(f"  {event_line(envelope)}" for envelope in envelopes)
    lines.append(f"  outcome: {outcome(order_status(envelopes))}")
    return "\n".join(lines)


def outcome(status: OrderStatus) -> str:
    if status.state == COMPLETED:
        return status.describe()
    if status.state in (CANCELLED, REJECTED):
        return status.describe()
    return f"in progress: {status.describe()}"


def event_line(envelope: Envelope, *, with_order: bool = False) -> str:
    """`time  source  type  key data`; `with_order` adds the order id (for a feed mixing orders)."""
    order = f"{envelope.order_id}  " if with_order else ""
    details = describe_event(envelope.data)
    line = f"{rfc3339_ms(envelope.occurred_at)}  {order}{envelope.source.value:<9}  {envelope.type:<26}  {details}"
    return line.rstrip()


def rfc3339_ms(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe_event(data: Event) -> str:  # noqa: PLR0911, PLR0912 - one branch per event type reads best
    """The data worth reading in one event: items and totals, amounts, reviewers, reasons."""
    if isinstance(data, OrderPlaced):
        return (
            f"{_order_lines(data.items)}; total {_money(data.total, data.currency)}; "
            f"customer {data.customer_id}; ship to {data.ship_to.country}"
        )
    if isinstance(data, OrderCancellationRequested | OrderCancellationRefused | OrderCancelled):
        return f"reason: {data.reason}"
    if isinstance(data, ShippingFailed | PaymentVoided):
        return f"reason: {data.reason}"
    if isinstance(data, InventoryReserved):
        return _order_lines(data.order.items)
    if isinstance(data, InventoryRejected):
        shortages = ", ".join(f"{s.sku} requested {s.requested} available {s.available}" for s in data.shortages)
        return f"reason: {data.reason}" + (f"; short: {shortages}" if shortages else "")
    if isinstance(data, InventoryReleased):
        return f"{_stock_lines(data.items)}; reason: {data.reason}"
    if isinstance(data, PaymentCharged):
        return _money(data.amount, data.currency)
    if isinstance(data, PaymentDeclined | PaymentRefunded):
        return f"{_money(data.amount, data.currency)}; reason: {data.reason}"
    if isinstance(data, PaymentRefundFailed):
        return (
            f"{_money(data.amount, data.currency)}; attempt {data.attempt} failed: {data.reason}; "
            f"retry at {rfc3339_ms(data.retry_at)}"
        )
    if isinstance(data, ApprovalRequested):
        return f"{_money(data.amount, data.currency)}; decide by {rfc3339_ms(data.deadline)}"
    if isinstance(data, ApprovalEscalated):
        return f"decide by {rfc3339_ms(data.deadline)}"
    if isinstance(data, ApprovalDecisionSubmitted):
        verdict = "approve" if data.approved else "deny"
        return f"{verdict} by {data.reviewer}" + (f"; comment: {data.comment}" if data.comment else "")
    if isinstance(data, ApprovalGranted):
        return f"by {data.reviewer}; reason: {data.reason}" + (f"; comment: {data.comment}" if data.comment else "")
    if isinstance(data, ApprovalDenied):
        return f"by {data.reviewer}" + (f"; comment: {data.comment}" if data.comment else "")
    if isinstance(data, ApprovalTimedOut):
        return f"deadline {_moment(data.deadline)} passed"
    if isinstance(data, ApprovalDecisionIgnored):
        return f"decision by {data.reviewer}; reason: {data.reason}"
    if isinstance(data, ShipmentScheduled):
        return f"{data.carrier} shipment {data.shipment_id} to {data.ship_to}"
    if isinstance(data, ShipmentCancelled):
        booked = "a booked shipment" if data.had_shipment else "nothing booked"
        return f"{booked}; reason: {data.reason}"
    if isinstance(data, OrderCommandRejected):
        return _rejection(data)
    if isinstance(data, OrderCompleted):
        return f"{_stock_lines(data.items)}; total {_money(data.total, data.currency)}; customer {data.customer_id}"
    return ""


def _rejection(data: OrderCommandRejected) -> str:
    where = f"partition {data.partition}, offset {data.offset}"
    return f"{data.command_type or 'a record'} on {data.topic} ({where}): {data.reason}"


def _reason_of(data: Event) -> str | None:
    reason = getattr(data, "reason", None)
    if isinstance(data, ApprovalDenied):
        return f"denied by {data.reviewer}" + (f": {data.comment}" if data.comment else "")
    if isinstance(data, ApprovalTimedOut):
        return f"approval deadline {_moment(data.deadline)} passed"
    return reason if isinstance(reason, str) else None


def _order_lines(items: Sequence[OrderLine]) -> str:
    return ", ".join(f"{line.sku}{TIMES}{line.quantity} @ {format(line.unit_price, 'f')}" for line in items)


def _stock_lines(items: Sequence[StockLine]) -> str:
    return ", ".join(f"{line.sku}{TIMES}{line.quantity}" for line in items)


def _money(amount: Decimal, currency: str) -> str:
    return f"{format(amount, 'f')} {currency}"


def _moment(value: datetime) -> str:
    # ApprovalTimedOut's deadline may be naive in the contract; read a naive time as UTC.
    return rfc3339_ms(value if value.tzinfo is not None else value.replace(tzinfo=UTC))

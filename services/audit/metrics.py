"""The saga's outcomes as the audit sees them: it writes every event to `audit` exactly once.

Counted from the events the audit writes, after the transaction that writes them commits, so
each saga event is counted once however often it was published or read. Cancellation reasons are
free text; their category is read from the prefixes the services put on them (inventory:
`inventory rejected: ...`, `payment declined: ...`; a refund or a void passes on the payment
step's reason: `approval denied`, `approval timed out`, `shipping failed: ...`, `order cancelled: ...`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from prometheus_client import Counter, Histogram
from prometheus_client.registry import Collector

from schemas.envelope import Envelope
from schemas.events import (
    InventoryReleased,
    OrderCancelled,
    OrderCompleted,
    OrderPlaced,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentVoided,
    ShipmentCancelled,
)
from services.audit.domain import HeldEvent

OUTCOME_OF = {OrderCompleted.__name__: "completed", OrderCancelled.__name__: "cancelled"}
STEP_OF = {
    InventoryReleased.__name__: "inventory_released",
    PaymentRefunded.__name__: "payment_refunded",
    PaymentVoided.__name__: "payment_voided",
    ShipmentCancelled.__name__: "shipment_cancelled",
}
CANCELLATION_REASONS = (
    "inventory_rejected",
    "payment_declined",
    "approval_denied",
    "approval_timed_out",
    "shipping_failed",
    "customer_request",
    "other",
)
_OWN_PREFIXES = (("inventory rejected", "inventory_rejected"), ("payment declined", "payment_declined"))
# What inventory puts before the payment step's reason when a refund or a void ends the order.
_PASSED_ON = ("payment refunded: ", "cancelled: ")
_PAYMENT_PREFIXES = (
    ("approval denied", "approval_denied"),
    ("approval timed out", "approval_timed_out"),
    ("shipping failed", "shipping_failed"),
    ("order cancelled", "customer_request"),
)
# Sagas end in milliseconds unless a reviewer must decide, which may take up to the approval timeout (24 h).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)


def cancellation_category(reason: str) -> str:
    """The category of an `OrderCancelled` reason, one of `CANCELLATION_REASONS`."""
    text = reason.strip().lower()
    for prefix, category in _OWN_PREFIXES:
        if text.startswith(prefix):
            return category
    for passed_on in _PASSED_ON:
        if text.startswith(passed_on):
            rest = text.removeprefix(passed_on)
            for prefix, category in _PAYMENT_PREFIXES:
                if rest.startswith(prefix):
                    return category
    return "other"


class AuditMetrics:
    """The audit's saga metrics, built unregistered: the process's wiring registers `collectors()`."""

    def __init__(self) -> None:
        r = None  # unregistered (the client's default would be its global registry)
        self.events = Counter(
            "choreo_saga_events", "Saga events written to the audit topic, by type.", ["type"], registry=r
        )
        self.outcomes = Counter(
            "choreo_saga_outcomes", "Sagas that ended, by outcome (completed, cancelled).", ["outcome"], registry=r
        )
        self.cancellations = Counter(
            "choreo_saga_cancellations",
            "Cancelled sagas, by the category of the cancellation's reason.",
            ["reason"],
            registry=r,
        )
        self.compensations = Counter(
            "choreo_saga_compensations",
            "Compensating steps taken (inventory_released, payment_refunded, payment_voided, shipment_cancelled).",
            ["step"],
            registry=r,
        )
        self.refund_retries = Counter(
            "choreo_refund_retries", "Refund attempts that failed and are retried (PaymentRefundFailed).", registry=r
        )
        self.duration = Histogram(
            "choreo_saga_duration_seconds",
            "From an order's OrderPlaced to its terminal event (their occurred_at), by outcome.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        # Each labelled child kept at hand: `labels()` builds a tuple and takes a lock, for every event written.
        self._events_of: dict[str, Counter] = {}
        self._outcome_of = {outcome: self.outcomes.labels(outcome) for outcome in OUTCOME_OF.values()}
        self._duration_of = {outcome: self.duration.labels(outcome) for outcome in OUTCOME_OF.values()}
        self._cancellations_of = {category: self.cancellations.labels(category) for category in CANCELLATION_REASONS}
        self._compensations_of = {step: self.compensations.labels(step) for step in STEP_OF.values()}

    def collectors(self) -> Sequence[Collector]:
        return (self.events, self.outcomes, self.cancellations, self.compensations, self.refund_retries, self.duration)

    def written(self, events: Iterable[HeldEvent], placed_at: datetime | None) -> None:
        """Count events just written to `audit`; `placed_at` is when the order's OrderPlaced occurred, if known."""
        for event in events:
            self._events(event.type).inc()
            if event.type == OrderPlaced.__name__:
                placed_at = event.occurred_at
            elif event.type == PaymentRefundFailed.__name__:
                self.refund_retries.inc()
            step = STEP_OF.get(event.type)
            if step is not None:
                self._compensations_of[step].inc()
            outcome = OUTCOME_OF.get(event.type)
            if outcome is None:
                continue
            self._outcome_of[outcome].inc()
            if placed_at is not None:
                self._duration_of[outcome].observe(max(0.0, (event.occurred_at - placed_at).total_seconds()))
            if event.type == OrderCancelled.__name__:
                cancelled = Envelope.from_bytes(event.raw.encode()).data
                reason = cancelled.reason if isinstance(cancelled, OrderCancelled) else ""
                self._cancellations_of[cancellation_category(reason)].inc()

    def _events(self, event_type: str) -> Counter:
        child = self._events_of.get(event_type)
        if child is None:
            child = self._events_of[event_type] = self.events.labels(event_type)
        return child

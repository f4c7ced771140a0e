"""The topic registry: every topic with its key, the event types it carries and its configuration.

Services name topics only through this module. Topics marked `partitioned_by_order` share one
partition count, so an order's events land on the same partition number of every saga topic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from schemas.events import (
    EVENT_TYPES,
    MONITOR_EVENTS,
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
    OrderPlaced,
    PaymentCharged,
    PaymentDeclined,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentVoided,
    SagaStuck,
    ServiceDegraded,
    ServiceRecovered,
    ShipmentCancelled,
    ShipmentScheduled,
    ShippingFailed,
)


@dataclass(frozen=True)
class Topic:
    name: str
    key: str
    value: str
    description: str
    events: tuple[type[Event], ...] = ()
    config: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    partitioned_by_order: bool = True
    internal: bool = False
    # Clients write it: every record is parsed and validated whole, whatever its headers say.
    written_by_clients: bool = False
    # On a topic clients write, the one service that sends a record found on another partition than
    # its key's to the right one, and dead-letters an invalid one; its other readers skip both, so
    # a record is forwarded or dead-lettered once, not once per reader.
    routed_by: str | None = None

    @property
    def compacted(self) -> bool:
        return "compact" in self.config.get("cleanup.policy", "delete")


ENVELOPE = "Envelope (JSON)"
_COMPACT = MappingProxyType({"cleanup.policy": "compact"})
_DELETE = MappingProxyType({"cleanup.policy": "delete"})

ORDERS = Topic(
    "orders",
    key="order_id",
    value=ENVELOPE,
    description="Client commands: place or cancel an order.",
    events=(OrderPlaced, OrderCancellationRequested),
    config=_DELETE,
    written_by_clients=True,
    routed_by="inventory",
)
INVENTORY_EVENTS = Topic(
    "inventory.events",
    key="order_id",
    value=ENVELOPE,
    description="Reservations, rejections and releases of stock; the terminal OrderCancelled.",
    events=(InventoryReserved, InventoryRejected, InventoryReleased, OrderCancelled),
    config=_DELETE,
)
PAYMENT_EVENTS = Topic(
    "payment.events",
    key="order_id",
    value=ENVELOPE,
    description="Charges, declines, refunds (and failed refund attempts, retried) and voids.",
    events=(PaymentCharged, PaymentDeclined, PaymentRefundFailed, PaymentRefunded, PaymentVoided),
    config=_DELETE,
)
APPROVAL_EVENTS = Topic(
    "approval.events",
    key="order_id",
    value=ENVELOPE,
    description="Approval outcomes: requested, escalated, granted, denied, timed out, decisions ignored.",
    events=(
        ApprovalRequested,
        ApprovalEscalated,
        ApprovalGranted,
        ApprovalDenied,
        ApprovalTimedOut,
        ApprovalDecisionIgnored,
    ),
    config=_DELETE,
)
APPROVAL_DECISIONS = Topic(
    "approval.decisions",
    key="order_id",
    value=ENVELOPE,
    description="Reviewers' decisions as submitted, over HTTP or straight to the topic.",
    events=(ApprovalDecisionSubmitted,),
    config=_DELETE,
    written_by_clients=True,
    routed_by="approval",
)
SHIPPING_EVENTS = Topic(
    "shipping.events",
    key="order_id",
    value=ENVELOPE,
    description="Shipments scheduled, failed or cancelled; the terminal OrderCompleted; refused cancellations.",
    events=(ShipmentScheduled, ShippingFailed, ShipmentCancelled, OrderCompleted, OrderCancellationRefused),
    config=_DELETE,
)
AUDIT = Topic(
    "audit",
    key="order_id",
    value=ENVELOPE,
    description=(
        "Every saga event exactly once, keyed by order: each order's timeline in order; "
        "and OrderCommandRejected, the audit's own, for a client's command that failed validation."
    ),
    events=tuple(event for event in EVENT_TYPES.values() if event not in MONITOR_EVENTS),
    config=_DELETE,
)
MONITOR_ALERTS = Topic(
    "monitor.alerts",
    key="the subject: `service:<name>` for service health, the order id for SagaStuck",
    value=ENVELOPE + "; `order_id` holds the same subject",
    description="Health and SLA alerts raised by the monitor.",
    events=(ServiceDegraded, ServiceRecovered, SagaStuck),
    config=_DELETE,
    partitioned_by_order=False,
)
MONITOR_STATE = Topic(
    "monitor.state",
    key="`service:<name>`, `saga:<order_id>`, or `sla:<partition>` (latency histogram of one audit partition)",
    value="the monitor's latest state for that key (JSON); a null value deletes it",
    description="The monitor's state, one record per live key; compacted, so it never grows with time.",
    config=_COMPACT,
    partitioned_by_order=False,
)
DEAD_LETTER = Topic(
    "deadletter",
    key="the original key",
    value="DeadLetter (JSON): reason, origin and the original bytes",
    description="Messages a service could not accept, with the reason; nothing is dropped.",
    config=_DELETE,
    partitioned_by_order=False,
)

SAGA_TOPICS: tuple[Topic, ...] = (
    ORDERS,
    INVENTORY_EVENTS,
    PAYMENT_EVENTS,
    APPROVAL_EVENTS,
    APPROVAL_DECISIONS,
    SHIPPING_EVENTS,
)
PUBLIC_TOPICS: tuple[Topic, ...] = (*SAGA_TOPICS, AUDIT, MONITOR_ALERTS, MONITOR_STATE, DEAD_LETTER)
EVENT_TOPICS: tuple[Topic, ...] = (*SAGA_TOPICS, MONITOR_ALERTS)
AUDIT_EVENTS: tuple[type[Event], ...] = (OrderCommandRejected,)
"""Events only the audit writes, straight to the audit topic."""


def _changelog(service: str) -> Topic:
    return Topic(
        f"{service}.state",
        key="state key (`order:<order_id>`, or the entity the service owns)",
        value=f"{service}'s latest state for the key (JSON, internal); a null value deletes it",
        description=f"Changelog of {service}'s state, restored on start; compacted.",
        config=_COMPACT,
        internal=True,
    )


def _internal(name: str, key: str, description: str) -> Topic:
    return Topic(name, key=key, value="internal message (JSON)", description=description, config=_DELETE, internal=True)


INVENTORY_STATE = _changelog("inventory")
PAYMENT_STATE = _changelog("payment")
APPROVAL_STATE = _changelog("approval")
SHIPPING_STATE = _changelog("shipping")
AUDIT_STATE = _changelog("audit")
STOCK_REQUESTS = _internal(
    "inventory.stock-requests", "sku", "Hold, release or ship stock of one SKU for one order; owned by the SKU's task."
)
STOCK_REPLIES = _internal("inventory.stock-replies", "order_id", "Per-SKU answers to holds, back to the order's task.")
LEDGER_REQUESTS = _internal(
    "payment.ledger-requests", "customer_id", "Hold, release or refund credit of one customer for one order."
)
LEDGER_REPLIES = _internal("payment.ledger-replies", "order_id", "The ledger's answers, back to the order's task.")

INTERNAL_TOPICS: tuple[Topic, ...] = (
    INVENTORY_STATE,
    PAYMENT_STATE,
    APPROVAL_STATE,
    SHIPPING_STATE,
    AUDIT_STATE,
    STOCK_REQUESTS,
    STOCK_REPLIES,
    LEDGER_REQUESTS,
    LEDGER_REPLIES,
)
ALL_TOPICS: tuple[Topic, ...] = (*PUBLIC_TOPICS, *INTERNAL_TOPICS)


def topic_of(event_type: type[Event]) -> Topic:
    """The topic an event type is published on (the audit's own events: the audit topic)."""
    for topic in (*EVENT_TOPICS, AUDIT):
        if event_type in topic.events:
            return topic
    raise KeyError(f"{event_type.__name__} is published on no topic")

"""Hand-built sagas of one order, and a harness that drives the audit StreamApp without a broker."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from schemas.envelope import Envelope, Source
from schemas.events import (
    Address,
    ApprovalDecisionSubmitted,
    ApprovalDenied,
    ApprovalGranted,
    ApprovalRequested,
    InventoryRejected,
    InventoryReleased,
    InventoryReserved,
    OrderCancellationRefused,
    OrderCancellationRequested,
    OrderCancelled,
    OrderCompleted,
    OrderDetails,
    OrderLine,
    OrderPlaced,
    PaymentCharged,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentVoided,
    ShipmentCancelled,
    ShipmentScheduled,
    ShippingFailed,
    Shortage,
    StockLine,
)
from schemas.topics import AUDIT, DEAD_LETTER, topic_of
from services.audit.app import AuditApp
from services.audit.domain import HELD_INDEX_KEY, AuditOrderState, HeldIndex
from services.common.kafka import partition_for
from services.common.processor import Incoming, TaskContext
from services.common.saga import order_key
from services.common.settings import ChoreoSettings
from services.common.state import KeyedStore

SETTINGS = ChoreoSettings(_env_file=None, partitions=6, topic_prefix="")
WAIT = timedelta(seconds=10)
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


def details(*lines: tuple[str, int, str], country: str = "FR") -> OrderDetails:
    return OrderDetails(
        customer_id="c-1",
        items=[OrderLine(sku=sku, quantity=qty, unit_price=Decimal(price)) for sku, qty, price in lines],
        currency="EUR",
        ship_to=Address(country=country),
    )


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def placed(order_id: str, order: OrderDetails) -> Envelope:
    event = OrderPlaced(**order.model_dump())
    return Envelope.new(event, order_id=order_id, source=Source.CLIENT, occurred_at=_at(0))


def _then(cause: Envelope, event: object, source: Source, seconds: float) -> Envelope:
    envelope = cause.caused(event, source)  # type: ignore[arg-type]
    return envelope.model_copy(update={"occurred_at": _at(seconds)})


def completed_saga(order_id: str = "o-happy") -> list[Envelope]:
    """Below the threshold: placed → reserved → charged → granted → scheduled + completed."""
    order = details(("WIDGET-1", 2, "19.99"), ("GADGET-9", 1, "5.00"))
    p = placed(order_id, order)
    reserved = _then(p, InventoryReserved(order=order), Source.INVENTORY, 1)
    charged = _then(reserved, PaymentCharged(order=order, amount=order.total, currency="EUR"), Source.PAYMENT, 2)
    granted = _then(
        charged, ApprovalGranted(order=order, reviewer="system", reason="below threshold"), Source.APPROVAL, 3
    )
    scheduled = _then(granted, ShipmentScheduled(shipment_id="s-1", carrier="dhl", ship_to="FR"), Source.SHIPPING, 4)
    done = _then(
        granted,
        OrderCompleted(
            customer_id="c-1",
            total=order.total,
            currency="EUR",
            items=[StockLine(sku="WIDGET-1", quantity=2), StockLine(sku="GADGET-9", quantity=1)],
        ),
        Source.SHIPPING,
        4,
    )
    return [p, reserved, charged, granted, scheduled, done]


def _until_shipping_failed(order_id: str, order: OrderDetails) -> list[Envelope]:
    """Placed, reserved, charged and granted at 0 to 3 s; shipping fails at 4 s."""
    p = placed(order_id, order)
    reserved = _then(p, InventoryReserved(order=order), Source.INVENTORY, 1)
    charged = _then(reserved, PaymentCharged(order=order, amount=order.total, currency="EUR"), Source.PAYMENT, 2)
    granted = _then(
        charged, ApprovalGranted(order=order, reviewer="system", reason="below threshold"), Source.APPROVAL, 3
    )
    failed = _then(granted, ShippingFailed(reason="no carrier serves AQ"), Source.SHIPPING, 4)
    return [p, reserved, charged, granted, failed]


def _refunded_and_cancelled(failed: Envelope, order: OrderDetails, at: int) -> list[Envelope]:
    """Payment refunds at `at` s; inventory releases and cancels a second later."""
    refunded = _then(
        failed,
        PaymentRefunded(customer_id="c-1", amount=order.total, currency="EUR", reason="shipping failed"),
        Source.PAYMENT,
        at,
    )
    released = _then(
        refunded,
        InventoryReleased(items=[StockLine(sku="WIDGET-1", quantity=1)], reason="payment refunded"),
        Source.INVENTORY,
        at + 1,
    )
    cancelled = _then(
        refunded, OrderCancelled(reason="shipping failed: no carrier serves AQ"), Source.INVENTORY, at + 1
    )
    return [refunded, released, cancelled]


def shipping_failed_saga(order_id: str = "o-failed") -> list[Envelope]:
    """Shipping fails; payment refunds; inventory releases and cancels."""
    order = details(("WIDGET-1", 1, "50.00"), country="AQ")
    steps = _until_shipping_failed(order_id, order)
    return [*steps, *_refunded_and_cancelled(steps[-1], order, 5)]


def refund_retried_saga(order_id: str = "o-retried") -> list[Envelope]:
    """Shipping fails while the refund provider is down: attempts at 4 s and 5 s fail, the one at 7 s refunds."""
    order = details(("WIDGET-1", 1, "50.00"), country="AQ")
    steps = _until_shipping_failed(order_id, order)
    failed = steps[-1]
    attempts = [
        Envelope.new(
            PaymentRefundFailed(
                customer_id="c-1",
                amount=order.total,
                currency="EUR",
                attempt=attempt,
                reason="refund provider unavailable",
                retry_at=_at(retry_at),
            ),
            order_id=order_id,
            source=Source.PAYMENT,
            cause=failed,  # every attempt is caused by the compensating event, each with its own id
            occurred_at=_at(at),
            event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{failed.event_id}/{attempt}"),
        )
        for attempt, at, retry_at in ((1, 4, 5), (2, 5, 7))
    ]
    return [*steps, *attempts, *_refunded_and_cancelled(failed, order, 7)]


def denied_saga(order_id: str = "o-denied") -> list[Envelope]:
    """At the threshold: approval requested, a reviewer denies it, the charge and the stock are compensated."""
    order = details(("TV-55", 1, "1200.00"))
    p = placed(order_id, order)
    reserved = _then(p, InventoryReserved(order=order), Source.INVENTORY, 1)
    charged = _then(reserved, PaymentCharged(order=order, amount=order.total, currency="EUR"), Source.PAYMENT, 2)
    requested = _then(
        charged,
        ApprovalRequested(order=order, amount=order.total, currency="EUR", deadline=_at(3600)),
        Source.APPROVAL,
        3,
    )
    decision = Envelope.new(
        ApprovalDecisionSubmitted(approved=False, reviewer="alice", comment="fraud risk"),
        order_id=order_id,
        source=Source.CLIENT,
        occurred_at=_at(60),
    )
    denied = _then(decision, ApprovalDenied(reviewer="alice", comment="fraud risk"), Source.APPROVAL, 61)
    refunded = _then(
        denied,
        PaymentRefunded(customer_id="c-1", amount=order.total, currency="EUR", reason="approval denied"),
        Source.PAYMENT,
        62,
    )
    released = _then(
        refunded,
        InventoryReleased(items=[StockLine(sku="TV-55", quantity=1)], reason="payment refunded"),
        Source.INVENTORY,
        63,
    )
    cancelled = _then(refunded, OrderCancelled(reason="approval denied by alice"), Source.INVENTORY, 63)
    return [p, reserved, charged, requested, decision, denied, refunded, released, cancelled]


def customer_cancelled_saga(order_id: str = "o-cancel") -> list[Envelope]:
    """The customer cancels while the reservation is in flight: shipping closes, payment voids, inventory cancels."""
    order = details(("WIDGET-1", 1, "10.00"))
    p = placed(order_id, order)
    cancel = Envelope.new(
        OrderCancellationRequested(reason="changed my mind"),
        order_id=order_id,
        source=Source.CLIENT,
        occurred_at=_at(0.5),
    )
    closed = _then(cancel, ShipmentCancelled(had_shipment=False, reason="changed my mind"), Source.SHIPPING, 1)
    voided = _then(closed, PaymentVoided(reason="changed my mind"), Source.PAYMENT, 2)
    released = _then(
        voided,
        InventoryReleased(items=[StockLine(sku="WIDGET-1", quantity=1)], reason="order cancelled"),
        Source.INVENTORY,
        3,
    )
    cancelled = _then(voided, OrderCancelled(reason="changed my mind"), Source.INVENTORY, 3)
    return [p, cancel, closed, voided, released, cancelled]


def rejected_saga(order_id: str = "o-rejected") -> list[Envelope]:
    order = details(("RARE-1", 5, "3.00"))
    p = placed(order_id, order)
    rejected = _then(
        p,
        InventoryRejected(reason="insufficient stock", shortages=[Shortage(sku="RARE-1", requested=5, available=2)]),
        Source.INVENTORY,
        1,
    )
    cancelled = _then(p, OrderCancelled(reason="insufficient stock"), Source.INVENTORY, 1)
    return [p, rejected, cancelled]


def refused_cancellation(completed: list[Envelope]) -> list[Envelope]:
    """A cancellation that arrives after completion, and its refusal."""
    cancel = Envelope.new(
        OrderCancellationRequested(reason="too late"),
        order_id=completed[0].order_id,
        source=Source.CLIENT,
        occurred_at=_at(100),
    )
    refused = _then(cancel, OrderCancellationRefused(reason="order already completed"), Source.SHIPPING, 101)
    return [cancel, refused]


SCENARIOS = {
    "completed": completed_saga,
    "shipping failed": shipping_failed_saga,
    "approval denied": denied_saga,
    "refund retried": refund_retried_saga,
    "customer cancelled": customer_cancelled_saga,
    "inventory rejected": rejected_saga,
}


def topic_name(envelope: Envelope) -> str:
    return topic_of(type(envelope.data)).name


def interleave(events: list[Envelope], topic_order: list[str]) -> list[Envelope]:
    """`events` as one consumer may receive them: each topic's events keep their order (a partition is
    ordered), while the topics interleave as `topic_order` says: its i-th entry names the topic of the
    i-th arrival, so it must hold each topic as often as `events` has events of it."""
    queues: dict[str, list[Envelope]] = {}
    for event in events:
        queues.setdefault(topic_name(event), []).append(event)
    return [queues[name].pop(0) for name in topic_order]


def record(envelope: Envelope, offset: int = 0, *, value: bytes | None = None) -> Incoming:
    """The envelope as it would be read from its saga topic."""
    return Incoming(
        topic=topic_of(type(envelope.data)),
        partition=partition_for(envelope.key, SETTINGS.partitions),
        offset=offset,
        key=envelope.key,
        value=envelope.to_bytes() if value is None else value,
        timestamp_ms=0,
        headers=envelope.headers(),
    )


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


@dataclass
class Harness:
    """One task of the audit service: a store that outlives batches, a fresh context per batch."""

    partition: int
    clock: Clock = field(default_factory=Clock)
    store: KeyedStore = field(default_factory=KeyedStore)
    app: AuditApp | None = None
    audit: list[bytes] = field(default_factory=list)
    dead_letters: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.app is None:
            self.app = AuditApp(causal_wait=WAIT, clock=self.clock)

    @classmethod
    def for_order(cls, order_id: str) -> Harness:
        return cls(partition=partition_for(order_id.encode(), SETTINGS.partitions))

    def restarted(self) -> Harness:
        """The same committed state, served by a new process."""
        return Harness(self.partition, self.clock, self.store, AuditApp(causal_wait=WAIT, clock=self.clock))

    def feed(self, *messages: Incoming | Envelope) -> list[Envelope]:
        """One batch; returns what it wrote to the audit topic."""
        assert self.app is not None
        task = self._context()
        for offset, message in enumerate(messages):
            incoming = record(message, offset) if isinstance(message, Envelope) else message
            assert incoming.partition == self.partition
            self.app.process(task, incoming)
        return self._collect(task)

    def tick(self, after: timedelta = timedelta(0)) -> list[Envelope]:
        assert self.app is not None
        task = self._context()
        self.app.tick(task, self.clock.advance(after))
        return self._collect(task)

    def state(self, order_id: str) -> AuditOrderState | None:
        return self.store.get(order_key(order_id), AuditOrderState)

    def held_index(self) -> HeldIndex:
        return self.store.get(HELD_INDEX_KEY, HeldIndex) or HeldIndex()

    def audited(self) -> list[Envelope]:
        return [Envelope.from_bytes(raw) for raw in self.audit]

    def _context(self) -> TaskContext:
        return TaskContext(self.partition, SETTINGS, "audit", self.store)

    def _collect(self, task: TaskContext) -> list[Envelope]:
        written = []
        for out in task.outbox:
            assert out.value is not None
            if out.topic == SETTINGS.topic(AUDIT):
                assert out.partition is None  # keyed: Kafka's partitioner puts it with the order
                self.audit.append(out.value)
                written.append(Envelope.from_bytes(out.value))
            elif out.topic == SETTINGS.topic(DEAD_LETTER):
                self.dead_letters.append(out.value)
            else:
                raise AssertionError(f"unexpected output topic {out.topic}")
        self.store.commit()
        return written

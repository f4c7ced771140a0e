"""Drives the real payment StreamApp through real TaskContexts and in-memory KeyedStores, no broker.

Records go to the task their key hashes to, like Kafka's default partitioner; internal messages the
app sends wait in per-partition FIFO queues until delivered, so a test chooses when the ledger answers.
"""

from __future__ import annotations

import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from schemas.deadletter import DeadLetter
from schemas.envelope import Envelope, Source
from schemas.events import (
    Address,
    ApprovalDenied,
    ApprovalTimedOut,
    Event,
    InventoryReserved,
    OrderDetails,
    OrderLine,
    ShipmentCancelled,
    ShippingFailed,
)
from schemas.topics import ALL_TOPICS, DEAD_LETTER, LEDGER_REPLIES, LEDGER_REQUESTS, Topic, topic_of
from services.common.kafka import partition_for
from services.common.processor import Incoming, TaskContext
from services.common.saga import order_key
from services.common.state import KeyedStore
from services.common.transactions import Outgoing
from services.payment.app import PaymentApp, customer_key, ledger_balances, settlement_key
from services.payment.domain import (
    CreditLimits,
    CustomerLedger,
    LedgerReply,
    LedgerRequest,
    PaymentOrder,
    Settlement,
)
from services.payment.refunds import (
    PROVIDER_UNAVAILABLE,
    LedgerRefunds,
    RefundBackoff,
    RefundFailure,
    RefundProvider,
)
from services.payment.settings import PaymentSettings

SETTINGS = PaymentSettings(topic_prefix="", partitions=6)
TOPICS = {SETTINGS.topic(topic): topic for topic in ALL_TOPICS}


@dataclass(frozen=True)
class Out:
    """One outgoing record, decoded: an Envelope, a LedgerRequest, a LedgerReply or a DeadLetter."""

    topic: Topic
    key: str
    value: Any
    raw: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def decode_out(out: Outgoing) -> Out:
    topic = TOPICS[out.topic]
    assert out.key is not None
    assert out.value is not None
    value: Any
    if topic == LEDGER_REQUESTS:
        value = LedgerRequest.model_validate_json(out.value)
    elif topic == LEDGER_REPLIES:
        value = LedgerReply.model_validate_json(out.value)
    elif topic == DEAD_LETTER:
        value = DeadLetter.model_validate_json(out.value)
    else:
        value = Envelope.from_bytes(out.value)
    return Out(topic, out.key.decode(), value, out.value, out.headers)


T0 = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


@dataclass
class FlakyRefunds:
    """A refund provider that fails the first `failures` attempts of each order (per-order overrides), then succeeds."""

    failures: int = 0
    per_order: dict[str, int] = field(default_factory=dict)
    attempts: list[tuple[str, Decimal, str, datetime]] = field(default_factory=list)

    def refund(self, order_id: str, amount: Decimal, currency: str, now: datetime) -> RefundFailure | None:
        self.attempts.append((order_id, amount, currency, now))
        made = sum(1 for attempt in self.attempts if attempt[0] == order_id)
        if made <= self.per_order.get(order_id, self.failures):
            return RefundFailure(PROVIDER_UNAVAILABLE)
        return None


@dataclass
class Harness:
    limits: dict[str, Decimal] = field(default_factory=dict)
    default_limit: Decimal = Decimal("1000.00")
    refunds: RefundProvider = field(default_factory=LedgerRefunds)
    backoff: RefundBackoff = field(default_factory=RefundBackoff)
    now: datetime = T0
    app: PaymentApp = field(init=False)
    stores: defaultdict[int, KeyedStore] = field(default_factory=lambda: defaultdict(KeyedStore))
    pending: dict[tuple[str, int], deque[Outgoing]] = field(default_factory=dict)
    log: list[Out] = field(default_factory=list)
    offset: int = 0

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """A new instance of the app over the same committed state (as restored from the changelog)."""
        self.app = PaymentApp(
            CreditLimits(default=self.default_limit, customers=dict(self.limits)),
            refunds=self.refunds,
            backoff=self.backoff,
            clock=lambda: self.now,
        )

    # --- feeding records ----------------------------------------------------------------------

    def deliver(
        self,
        topic: Topic,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        headers: tuple[tuple[str, bytes], ...] = (),
    ) -> list[Out]:
        """Process one record in its task (one committed batch); returns what it produced."""
        if partition is None:
            partition = partition_for(key or b"", SETTINGS.partitions)
        self.offset += 1
        message = Incoming(topic, partition, self.offset, key, value, 0, headers)
        return self._run(partition, lambda task: self.app.process(task, message))

    def tick(self, at: datetime | None = None) -> list[Out]:
        """Move the clock to `at` (if given) and tick every task, as the runner does about every second."""
        if at is not None:
            self.now = at
        produced: list[Out] = []
        for partition in range(SETTINGS.partitions):
            produced.extend(self._run(partition, lambda task: self.app.tick(task, self.now)))
        return produced

    def _run(self, partition: int, work: Callable[[TaskContext], None]) -> list[Out]:
        store = self.stores[partition]
        task = TaskContext(partition, SETTINGS, self.app.name, store)
        work(task)
        store.commit()
        produced = [decode_out(out) for out in task.outbox]
        for out, decoded in zip(task.outbox, produced, strict=True):
            if decoded.topic in (LEDGER_REQUESTS, LEDGER_REPLIES):
                slot = (out.topic, partition_for(out.key or b"", SETTINGS.partitions))
                self.pending.setdefault(slot, deque()).append(out)
        self.log.extend(produced)
        return produced

    def publish(self, envelope: Envelope) -> list[Out]:
        return self.deliver(topic_of(type(envelope.data)), envelope.key, envelope.to_bytes())

    def queues(self) -> list[tuple[str, int]]:
        return sorted(slot for slot, queue in self.pending.items() if queue)

    def deliver_next(self, slot: tuple[str, int]) -> list[Out]:
        out = self.pending[slot].popleft()
        return self.deliver(TOPICS[out.topic], out.key, out.value)

    def pump(self) -> list[Out]:
        """Deliver internal messages until none is left (the ledger round trips)."""
        produced: list[Out] = []
        while slots := self.queues():
            produced.extend(self.deliver_next(slots[0]))
        return produced

    # --- reading state and outputs ------------------------------------------------------------

    def order(self, order_id: str) -> PaymentOrder | None:
        return self.store_of(order_id).get(order_key(order_id), PaymentOrder)

    def ledger(self, customer_id: str) -> CustomerLedger | None:
        return self.store_of(customer_id).get(customer_key(customer_id), CustomerLedger)

    def settlement(self, customer_id: str, order_id: str) -> Settlement | None:
        return self.store_of(customer_id).get(settlement_key(customer_id, order_id), Settlement)

    def balances(self) -> dict[str, CustomerLedger]:
        found: dict[str, CustomerLedger] = {}
        for store in self.stores.values():
            found.update(ledger_balances(store))
        return found

    def events(self, order_id: str | None = None) -> list[Envelope]:
        return [
            out.value
            for out in self.log
            if isinstance(out.value, Envelope) and (order_id is None or out.value.order_id == order_id)
        ]

    def requests(self, order_id: str | None = None) -> list[LedgerRequest]:
        return [
            out.value
            for out in self.log
            if isinstance(out.value, LedgerRequest) and (order_id is None or out.value.order_id == order_id)
        ]

    def partition_of(self, key: str) -> int:
        return partition_for(key.encode(), SETTINGS.partitions)

    def store_of(self, key: str) -> KeyedStore:
        return self.stores[self.partition_of(key)]


# --- builders -----------------------------------------------------------------------------------


def details(customer_id: str = "alice", *prices: str, currency: str = "EUR") -> OrderDetails:
    lines = [OrderLine(sku=f"sku-{n}", quantity=1, unit_price=Decimal(p)) for n, p in enumerate(prices or ("25.00",))]
    return OrderDetails(customer_id=customer_id, items=lines, currency=currency, ship_to=Address(country="FR"))


def envelope(event: Event, order_id: str, source: Source) -> Envelope:
    return Envelope.new(event, order_id=order_id, source=source, cause=uuid.uuid4())


def reserved(order_id: str, order: OrderDetails) -> Envelope:
    return envelope(InventoryReserved(order=order), order_id, Source.INVENTORY)


def approval_denied(order_id: str) -> Envelope:
    return envelope(ApprovalDenied(reviewer="rita"), order_id, Source.APPROVAL)


def approval_timed_out(order_id: str) -> Envelope:
    return envelope(ApprovalTimedOut(deadline=datetime(2030, 1, 1, tzinfo=UTC)), order_id, Source.APPROVAL)


def shipping_failed(order_id: str, reason: str = "destination not served") -> Envelope:
    return envelope(ShippingFailed(reason=reason), order_id, Source.SHIPPING)


def shipment_cancelled(order_id: str, reason: str = "changed my mind") -> Envelope:
    return envelope(ShipmentCancelled(had_shipment=False, reason=reason), order_id, Source.SHIPPING)

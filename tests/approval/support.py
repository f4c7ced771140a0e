"""The approval app driven through real TaskContexts with in-memory stores and changelog (no broker)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from schemas.deadletter import DeadLetter
from schemas.envelope import Envelope, Source
from schemas.events import (
    Address,
    ApprovalDecisionSubmitted,
    Event,
    OrderCancellationRequested,
    OrderDetails,
    OrderLine,
    PaymentCharged,
)
from schemas.topics import APPROVAL_EVENTS, DEAD_LETTER, PAYMENT_EVENTS, Topic
from services.approval.app import ApprovalApp, build_app
from services.approval.domain import DEADLINES_KEY, ApprovalState, DeadlineIndex
from services.approval.publisher import PublishError
from services.approval.settings import ApprovalSettings
from services.common.processor import Incoming, KeyedStore, TaskContext
from services.common.saga import order_key, partition_for

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(hours=24)


# --- harness ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Out:
    topic: str
    key: str | None
    envelope: Envelope | None
    dead_letter: DeadLetter | None


class Harness:
    """Every task of the app with an in-memory store and changelog; each feed or tick is one committed batch."""

    def __init__(self, app_settings: ApprovalSettings | None = None) -> None:
        self.settings = app_settings or ApprovalSettings(_env_file=None)
        self.app: ApprovalApp = build_app(self.settings)
        self.stores = {p: KeyedStore() for p in range(self.settings.partitions)}
        self.changelog: dict[int, list[tuple[str, bytes | None]]] = {p: [] for p in self.stores}
        self._offsets = itertools.count()

    def partition(self, order_id: str) -> int:
        return partition_for(order_id.encode(), self.settings.partitions)

    def feed(self, topic: Topic, envelope: Envelope) -> list[Out]:
        return self.feed_raw(topic, envelope.key, envelope.to_bytes(), self.partition(envelope.order_id))

    def feed_raw(self, topic: Topic, key: bytes | None, value: bytes | None, partition: int) -> list[Out]:
        message = Incoming(topic, partition, next(self._offsets), key, value, 0)
        return self._run(partition, lambda task: self.app.process(task, message))

    def tick(self, now: datetime) -> list[Out]:
        return [out for p in self.stores for out in self._run(p, lambda task: self.app.tick(task, now))]

    def restart(self) -> None:
        """A new instance of the app, its stores restored from the changelog as the runner does."""
        self.app = build_app(self.settings)
        self.stores = {p: KeyedStore() for p in self.stores}
        for p, records in self.changelog.items():
            for key, value in records:
                self.stores[p].restore(key, value)

    def state(self, order_id: str) -> ApprovalState | None:
        return self.stores[self.partition(order_id)].get(order_key(order_id), ApprovalState)

    def index(self, order_id: str) -> DeadlineIndex:
        store = self.stores[self.partition(order_id)]
        return store.get(DEADLINES_KEY, DeadlineIndex) or DeadlineIndex()

    def _run(self, partition: int, work: object) -> list[Out]:
        store = self.stores[partition]
        task = TaskContext(partition, self.settings, self.app.name, store)
        assert callable(work)
        work(task)
        self.changelog[partition].extend(store.pending_changes().items())
        store.commit()
        outs = []
        for out in task.outbox:
            assert out.value is not None
            key = out.key.decode() if out.key is not None else None
            if out.topic == self.settings.topic(DEAD_LETTER):
                outs.append(Out(out.topic, key, None, DeadLetter.model_validate_json(out.value)))
            else:
                outs.append(Out(out.topic, key, Envelope.from_bytes(out.value), None))
        return outs


def details(total: str = "1000.00", country: str = "FR") -> OrderDetails:
    return OrderDetails(
        customer_id="cust-1",
        items=[OrderLine(sku="sku-a", quantity=1, unit_price=Decimal(total))],
        currency="EUR",
        ship_to=Address(country=country),
    )


def charged(order_id: str, total: str = "1000.00", at: datetime = T0) -> Envelope:
    order = details(total)
    event = PaymentCharged(order=order, amount=order.total, currency="EUR")
    return Envelope.new(event, order_id=order_id, source=Source.PAYMENT, occurred_at=at)


def decision(
    order_id: str, approved: bool = True, reviewer: str = "alice", at: datetime = T0, comment: str | None = None
) -> Envelope:
    event = ApprovalDecisionSubmitted(approved=approved, reviewer=reviewer, comment=comment)
    return Envelope.new(event, order_id=order_id, source=Source.CLIENT, occurred_at=at)


def cancel(order_id: str, reason: str = "changed my mind") -> Envelope:
    return Envelope.new(OrderCancellationRequested(reason=reason), order_id=order_id, source=Source.CLIENT)


def events(outs: list[Out]) -> list[Event]:
    return [out.envelope.data for out in outs if out.envelope is not None]


def only(outs: list[Out]) -> Envelope:
    [out] = outs
    assert out.envelope is not None
    assert out.topic == APPROVAL_EVENTS.name
    assert out.key == out.envelope.order_id
    assert out.envelope.source is Source.APPROVAL
    return out.envelope


def pending(h: Harness, order_id: str = "o-1", at: datetime = T0) -> Envelope:
    """Bring the order to a pending approval; the ApprovalRequested envelope."""
    return only(h.feed(PAYMENT_EVENTS, charged(order_id, "1500.00", at)))


class RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[Envelope] = []
        self.failing = False

    async def publish(self, envelope: Envelope) -> None:
        if self.failing:
            raise PublishError("broker unreachable")
        self.published.append(envelope)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

"""The approval app driven through real TaskContexts with in-memory stores and changelog (no broker)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

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
from schemas.topics import APPROVAL_EVENTS, PAYMENT_EVENTS
from services.approval.app import ApprovalApp, build_app
from services.approval.domain import DEADLINES_KEY, ApprovalState, DeadlineIndex
from services.approval.publisher import PublishError
from services.approval.settings import ApprovalSettings
from services.common.saga import order_key
from tests.app_harness import AppHarness, Out

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(hours=24)


# --- harness ----------------------------------------------------------------------------------


class Harness(AppHarness[ApprovalApp, ApprovalSettings]):
    """The approval app over every task, without a broker."""

    def __init__(self, app_settings: ApprovalSettings | None = None) -> None:
        super().__init__(app_settings or ApprovalSettings(_env_file=None), build_app)

    def state(self, order_id: str) -> ApprovalState | None:
        return self.stores[self.partition(order_id)].get(order_key(order_id), ApprovalState)

    def index(self, order_id: str) -> DeadlineIndex:
        store = self.stores[self.partition(order_id)]
        return store.get(DEADLINES_KEY, DeadlineIndex) or DeadlineIndex()


def details(total: str = "1000.00", country: str = "FR", currency: str = "EUR") -> OrderDetails:
    return OrderDetails(
        customer_id="cust-1",
        items=[OrderLine(sku="sku-a", quantity=1, unit_price=Decimal(total))],
        currency=currency,
        ship_to=Address(country=country),
    )


def charged(order_id: str, total: str = "1000.00", at: datetime = T0, currency: str = "EUR") -> Envelope:
    order = details(total, currency=currency)
    event = PaymentCharged(order=order, amount=order.total, currency=currency)
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

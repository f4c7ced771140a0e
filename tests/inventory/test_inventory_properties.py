"""Property: whatever the arrival order and duplication of an order's events (and of the stock
replies), inventory never double-applies, never acts after a cancellation, conserves stock, and
leaves each order completed or compensated exactly once.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.envelope import Envelope, Source
from schemas.events import (
    InventoryReleased,
    OrderCancellationRequested,
    OrderCompleted,
    OrderDetails,
    OrderPlaced,
    PaymentCharged,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    ShipmentScheduled,
    StockLine,
)
from services.inventory.domain import OrderStatus
from tests.inventory.cluster import Cluster, caused, placed

# Scarce on purpose, so that concurrent orders compete and some are rejected.
STOCK = {"A-1": 8, "B-1": 4, "C-1": 2}
COMPENSATIONS = ("declined", "refunded", "voided")


@dataclass
class Plan:
    """One order's events as inventory can see them; exactly one of compensation/completion is set."""

    placed: Envelope
    compensation: Envelope | None
    completion: Envelope | None
    noise: list[Envelope]
    copies: dict[str, int] = field(default_factory=dict)

    @property
    def order_id(self) -> str:
        return self.placed.order_id

    @property
    def quantities(self) -> dict[str, int]:
        assert isinstance(self.placed.data, OrderPlaced)
        return self.placed.data.quantities()

    def external(self) -> list[Envelope]:
        events = [self.placed, *self.noise]
        events += [e for e in (self.compensation, self.completion) if e is not None]
        return events


def _compensation(kind: str, order_id: str) -> Envelope:
    amount = Decimal("10.00")
    if kind == "declined":
        return caused(
            PaymentDeclined(customer_id="c", amount=amount, currency="EUR", reason="no"), order_id, Source.PAYMENT
        )
    if kind == "refunded":
        event = PaymentRefunded(customer_id="c", amount=amount, currency="EUR", reason="denied")
        return caused(event, order_id, Source.PAYMENT)
    return caused(PaymentVoided(reason="customer request"), order_id, Source.PAYMENT)


@st.composite
def plans(draw: st.DrawFn, index: int) -> Plan:
    order_id = f"o-{index}"
    lines = draw(
        st.lists(st.tuples(st.sampled_from(sorted(STOCK)), st.integers(1, 4)), min_size=1, max_size=3), label="lines"
    )
    order = placed(order_id, *lines)
    kind = draw(st.sampled_from((None, *COMPENSATIONS)), label="compensation")
    compensation = _compensation(kind, order_id) if kind is not None else None
    completion = None
    if compensation is None:
        assert isinstance(order.data, OrderPlaced)
        items = [StockLine(sku=s, quantity=q) for s, q in sorted(order.data.quantities().items())]
        event = OrderCompleted(customer_id="c", total=order.data.total, currency="EUR", items=items)
        completion = caused(event, order_id, Source.SHIPPING)
    assert isinstance(order.data, OrderPlaced)
    details = OrderDetails(**{name: getattr(order.data, name) for name in OrderDetails.model_fields})
    noise = [
        Envelope.new(OrderCancellationRequested(reason="changed my mind"), order_id=order_id, source=Source.CLIENT),
        caused(PaymentCharged(order=details, amount=details.total, currency="EUR"), order_id, Source.PAYMENT),
        caused(ShipmentScheduled(shipment_id="s", carrier="c", ship_to="DE"), order_id, Source.SHIPPING),
    ]
    plan = Plan(order, compensation, completion, noise)
    plan.copies = {str(e.event_id): draw(st.integers(1, 3), label="copies") for e in plan.external()}
    return plan


def _published(cluster: Cluster, order_id: str) -> dict[str, set[str]]:
    ids: dict[str, set[str]] = defaultdict(set)
    for envelope in cluster.published:
        if envelope.order_id == order_id:
            ids[envelope.type].add(str(envelope.event_id))
    return ids


def _check_stock(cluster: Cluster, plans_: list[Plan]) -> None:
    for sku, level in cluster.levels().items():
        assert min(level.available, level.reserved, level.shipped) >= 0
        assert level.available + level.reserved == level.initial - level.shipped
        assert level.reserved == sum(level.holds.values())
        assert set(level.holds) <= {p.order_id for p in plans_}, sku


@given(data=st.data(), count=st.integers(1, 3))
@settings(max_examples=300, deadline=None)
def test_any_arrival_order_and_duplication_ends_each_order_exactly_once_and_conserves_stock(
    data: st.DataObject, count: int
) -> None:
    plans_ = [data.draw(plans(i)) for i in range(count)]
    cluster = Cluster(catalog=STOCK, partitions=3)
    inbox: list[Envelope] = [e for p in plans_ for e in p.external() for _ in range(p.copies[str(e.event_id)])]
    cancelled_before_reserved: set[str] = set()

    def deliverable(envelope: Envelope) -> bool:
        # Shipping completes only an order whose reservation inventory announced.
        return not isinstance(envelope.data, OrderCompleted) or "InventoryReserved" in _published(
            cluster, envelope.order_id
        )

    while True:
        choices: list[tuple[str, int]] = [("event", i) for i, e in enumerate(inbox) if deliverable(e)]
        choices += [("queue", i) for i in range(len(cluster.pending()))]
        if not choices:
            break
        kind, index = data.draw(st.sampled_from(choices), label="next")
        if kind == "queue":
            cluster.pump(cluster.pending()[index])
        else:
            envelope = inbox.pop(index)
            plan = next(p for p in plans_ if p.order_id == envelope.order_id)
            if envelope is plan.compensation and "InventoryReserved" not in _published(cluster, plan.order_id):
                cancelled_before_reserved.add(plan.order_id)
            cluster.deliver(envelope)
        _check_stock(cluster, plans_)
        for order_id in cancelled_before_reserved:
            assert "InventoryReserved" not in _published(cluster, order_id), "reserved after a cancellation"

    assert cluster.dead == []
    assert all(isinstance(e.data, OrderCompleted) for e in inbox)  # only completions of rejected orders remain

    # Every copy of an event is the same event: re-emissions are byte-for-byte the first emission.
    by_id: dict[str, set[str]] = defaultdict(set)
    for envelope in cluster.published:
        by_id[str(envelope.event_id)].add(envelope.model_dump_json())
    assert all(len(versions) == 1 for versions in by_id.values())

    shipped: Counter[str] = Counter()
    for plan in plans_:
        ids = _published(cluster, plan.order_id)
        types = set(ids)
        assert all(len(found) == 1 for found in ids.values()), ids  # nothing emitted twice with different ids
        triggers = {str(e.event_id) for e in plan.external()}
        assert {str(e.causation_id) for e in cluster.published if e.order_id == plan.order_id} <= triggers
        state = cluster.order(plan.order_id)
        assert state is not None
        if "InventoryRejected" in types:
            assert types == {"InventoryRejected", "OrderCancelled"}
            assert state.status is OrderStatus.REJECTED
        elif plan.compensation is None:
            assert types == {"InventoryReserved"}
            assert state.status is OrderStatus.SHIPPED
            shipped.update(plan.quantities)
        else:
            assert "OrderCancelled" in types
            assert state.status in (OrderStatus.RELEASED, OrderStatus.CANCELLED)
            if "InventoryReserved" in types:
                assert types == {"InventoryReserved", "InventoryReleased", "OrderCancelled"}
                [released] = [
                    e.data
                    for e in cluster.published
                    if isinstance(e.data, InventoryReleased) and e.order_id == plan.order_id
                ][:1]
                assert {line.sku: line.quantity for line in released.items} == plan.quantities
            assert types <= {"InventoryReserved", "InventoryReleased", "OrderCancelled"}

    # Conservation, with nothing left held: available + reserved = initial - shipped, reserved = 0.
    levels = cluster.levels()
    for sku, initial in STOCK.items():
        assert levels[sku].holds == {}
        assert (levels[sku].available, levels[sku].reserved, levels[sku].shipped) == (
            initial - shipped[sku],
            0,
            shipped[sku],
        )

    # A late redelivery of anything re-emits exactly what it caused, however late, and changes nothing.
    known = set(by_id)
    for plan in plans_:
        for envelope in plan.external():
            if deliverable(envelope):
                again = {str(p.envelope.event_id) for p in cluster.deliver(envelope).events}
                caused_by = {str(e.event_id) for e in cluster.published if e.causation_id == envelope.event_id}
                assert again == caused_by
    assert cluster.settle().empty
    assert {str(e.event_id) for e in cluster.published} == known
    assert cluster.levels() == levels

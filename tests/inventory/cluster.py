"""Every task of the inventory app in memory: records go in, outputs are routed like the broker would.

Public events and dead letters are collected; internal messages (stock requests and replies) are
queued per topic partition, in order, until a test delivers them (`pump`, `settle`), so a test can
hold replies back and interleave them with saga events.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import count

from pydantic import BaseModel

from schemas.deadletter import DeadLetter
from schemas.envelope import Envelope, Source
from schemas.events import Address, Event, OrderLine, OrderPlaced
from schemas.topics import DEAD_LETTER, STOCK_REPLIES, STOCK_REQUESTS, Topic, topic_of
from services.common.kafka import partition_for
from services.common.processor import Incoming, TaskContext
from services.common.saga import order_key
from services.common.state import KeyedStore
from services.common.transactions import Outgoing
from services.inventory.app import InventoryApp, stock_levels
from services.inventory.domain import InventoryOrder, SkuStock, StockReply, StockRequest
from services.inventory.settings import InventorySettings

CATALOG = {"WIDGET-1": 1000, "GADGET-1": 10, "LIMITED-1": 5, "EMPTY-1": 0}
INTERNAL = {STOCK_REQUESTS.name: STOCK_REQUESTS, STOCK_REPLIES.name: STOCK_REPLIES}


@dataclass(frozen=True)
class Published:
    topic: str
    key: bytes
    envelope: Envelope


@dataclass(frozen=True)
class Internal:
    topic: str
    key: bytes
    body: BaseModel


@dataclass
class Step:
    """What one record produced, decoded."""

    events: list[Published] = field(default_factory=list)
    internal: list[Internal] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)

    @property
    def types(self) -> list[str]:
        return [p.envelope.type for p in self.events]

    @property
    def empty(self) -> bool:
        return not (self.events or self.internal or self.dead)


class Cluster:
    def __init__(self, catalog: Mapping[str, int] = CATALOG, partitions: int = 3) -> None:
        self.catalog = dict(catalog)
        self.settings = InventorySettings(partitions=partitions, topic_prefix="")
        self.app = InventoryApp(catalog)
        self.stores = [KeyedStore() for _ in range(partitions)]
        self.queues: dict[tuple[str, int], deque[Incoming]] = {}
        self.published: list[Envelope] = []
        self.dead: list[DeadLetter] = []
        self._offsets = count()

    # --- input ------------------------------------------------------------------------------------

    def deliver(self, envelope: Envelope) -> Step:
        """A saga event, on the topic the registry assigns to its type, to the partition its key picks."""
        return self.feed(topic_of(type(envelope.data)), envelope.to_bytes(), envelope.key)

    def feed(self, topic: Topic, value: bytes | None, key: bytes | None, partition: int | None = None) -> Step:
        if partition is None:
            partition = partition_for(key or b"", self.settings.partitions)
        return self._process(Incoming(topic, partition, next(self._offsets), key, value, 0))

    def pending(self) -> list[tuple[str, int]]:
        return [queue for queue, messages in self.queues.items() if messages]

    def pump(self, queue: tuple[str, int]) -> Step:
        return self._process(self.queues[queue].popleft())

    def settle(self) -> Step:
        """Deliver internal messages until none is left; everything they produced, together."""
        total = Step()
        while self.pending():
            step = self.pump(self.pending()[0])
            total.events += step.events
            total.internal += step.internal
            total.dead += step.dead
        return total

    def _process(self, message: Incoming) -> Step:
        store = self.stores[message.partition]
        task = TaskContext(message.partition, self.settings, self.app.name, store)
        self.app.process(task, message)
        store.commit()
        return self._route(task.outbox)

    def _route(self, outbox: list[Outgoing]) -> Step:
        step = Step()
        for out in outbox:
            assert out.key is not None
            assert out.value is not None
            if out.topic in INTERNAL:
                body: BaseModel = (
                    StockRequest if out.topic == STOCK_REQUESTS.name else StockReply
                ).model_validate_json(out.value)
                step.internal.append(Internal(out.topic, out.key, body))
                partition = partition_for(out.key, self.settings.partitions)
                queued = Incoming(INTERNAL[out.topic], partition, next(self._offsets), out.key, out.value, 0)
                self.queues.setdefault((out.topic, partition), deque()).append(queued)
            elif out.topic == DEAD_LETTER.name:
                step.dead.append(DeadLetter.model_validate_json(out.value))
                self.dead.append(step.dead[-1])
            else:
                envelope = Envelope.from_bytes(out.value)
                assert out.topic == topic_of(type(envelope.data)).name
                assert out.key == envelope.key
                step.events.append(Published(out.topic, out.key, envelope))
                self.published.append(envelope)
        return step

    # --- reading state ----------------------------------------------------------------------------

    def order(self, order_id: str) -> InventoryOrder | None:
        store = self.stores[partition_for(order_id.encode(), self.settings.partitions)]
        return store.get(order_key(order_id), InventoryOrder)

    def levels(self) -> dict[str, SkuStock]:
        return stock_levels(*self.stores, catalog=self.catalog)

    def stored_skus(self) -> dict[str, SkuStock]:
        return stock_levels(*self.stores)


# --- building events ----------------------------------------------------------------------------------------


def placed(order_id: str, *lines: tuple[str, int], customer: str = "cust-1", country: str = "DE") -> Envelope:
    items = [OrderLine(sku=sku, quantity=quantity, unit_price=Decimal("9.99")) for sku, quantity in lines]
    event = OrderPlaced(customer_id=customer, items=items, currency="EUR", ship_to=Address(country=country))
    return Envelope.new(event, order_id=order_id, source=Source.CLIENT)


def caused(event: Event, order_id: str, source: Source) -> Envelope:
    """An event of another service, caused by something inventory never sees."""
    return Envelope.new(event, order_id=order_id, source=source, cause=uuid.uuid4())

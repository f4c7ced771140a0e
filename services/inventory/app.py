"""The inventory StreamApp: routes each record to the order stage or the SKU stage, and wiring."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TypeVar

from pydantic import BaseModel

from schemas.envelope import Source
from schemas.topics import (
    INVENTORY_STATE,
    ORDERS,
    PAYMENT_EVENTS,
    SHIPPING_EVENTS,
    STOCK_REPLIES,
    STOCK_REQUESTS,
    Topic,
)
from services.common.processor import Incoming, TaskContext
from services.common.saga import apply_once, apply_settled, decode, decode_internal, order_key, read_again
from services.common.state import KeyedStore
from services.inventory.domain import InventoryOrder, SkuStock, StockReply, StockRequest, load_catalog, sku_key
from services.inventory.handlers import SAGA_HANDLERS, stock_replied, stock_requested
from services.inventory.settings import InventorySettings

log = logging.getLogger(__name__)

Body = TypeVar("Body", bound=BaseModel)


class InventoryApp:
    name = "inventory"
    # OrderCancellationRequested, PaymentCharged and the other shipping events are read but have no
    # handler: a cancellation reaches inventory through payment, and only a completion moves stock.
    inputs: Sequence[Topic] = (ORDERS, PAYMENT_EVENTS, SHIPPING_EVENTS, STOCK_REQUESTS, STOCK_REPLIES)
    changelog = INVENTORY_STATE
    in_process: Sequence[Topic] = (STOCK_REQUESTS, STOCK_REPLIES)
    mostly_skipped: Sequence[Topic] = ()

    def __init__(self, catalog: Mapping[str, int]) -> None:
        self.catalog = dict(catalog)

    def process(self, task: TaskContext, message: Incoming) -> None:
        if message.topic.name == STOCK_REQUESTS.name:
            self._stock_request(task, message)
        elif message.topic.name == STOCK_REPLIES.name:
            self._stock_reply(task, message)
        else:
            envelope = decode(task, message, handles=SAGA_HANDLERS)
            if envelope is not None:
                apply_once(
                    task, message, envelope, source=Source.INVENTORY, model=InventoryOrder, handlers=SAGA_HANDLERS
                )

    def tick(self, task: TaskContext, now: datetime) -> None:
        """Inventory has no deadlines."""

    def _stock_request(self, task: TaskContext, message: Incoming) -> None:
        if read_again(task, message):
            return
        request = decode_internal(task, message, StockRequest, "sku", lambda body: body.sku)
        if request is None:
            return
        key = sku_key(request.sku)
        stock = task.store.get(key, SkuStock) or SkuStock.fresh(request.sku, self.catalog.get(request.sku, 0))
        change = stock_requested(stock, request)
        # An untouched SKU is not stored: it is its catalog entry, and unknown SKUs leave no trace.
        if change.stock != stock:
            task.store.put(key, change.stock)
        if change.reply is not None:
            task.send(STOCK_REPLIES, change.reply.order_id, change.reply.model_dump_json().encode())

    def _stock_reply(self, task: TaskContext, message: Incoming) -> None:
        reply = decode_internal(task, message, StockReply, "order_id", lambda body: body.order_id)
        if reply is None:
            return
        state = task.store.get(order_key(reply.order_id), InventoryOrder) or InventoryOrder(order_id=reply.order_id)
        settled = stock_replied(state, reply)
        emitted = apply_settled(task, state, settled.reaction, source=Source.INVENTORY, cause_id=settled.cause)
        if emitted:
            # Per order, routine: the order's timeline on audit says the same.
            log.debug(
                "reservation settled",
                extra={
                    "order_id": reply.order_id,
                    "status": settled.reaction.state.status.value,
                    "events": [e.type for e in emitted],
                },
            )


def build_app(settings: InventorySettings) -> InventoryApp:
    """The app with its catalog loaded; raises CatalogError naming the bad entry."""
    catalog = load_catalog(settings.inventory_catalog)
    log.info("catalog loaded", extra={"path": str(settings.inventory_catalog), "skus": len(catalog)})
    return InventoryApp(catalog)


def stock_levels(*stores: KeyedStore, catalog: Mapping[str, int] | None = None) -> dict[str, SkuStock]:
    """Every SKU's stock found in `stores` (one per task), by SKU; with `catalog`, untouched SKUs too."""
    levels: dict[str, SkuStock] = {sku: SkuStock.fresh(sku, initial) for sku, initial in (catalog or {}).items()}
    for store in stores:
        keys = store.keys()  # KeyedStore has no __iter__, so `for key in store` would not work
        for key in keys:
            stock = store.get(key, SkuStock) if key.startswith("sku:") else None
            if stock is not None:
                levels[stock.sku] = stock
    return dict(sorted(levels.items()))

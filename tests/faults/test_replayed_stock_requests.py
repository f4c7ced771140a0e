"""Found by the fault suite's rewind of inventory's consumer group: a replayed stock request shipped twice.

A SKU forgets an order once its hold is committed (shipped) or released, so when the SKU's task read
`inventory.stock-requests` again from older offsets (a rewound consumer group, an operator's offset
reset), the order's HOLD took the stock a second time and its COMMIT shipped it a second time. The
task now keeps the highest request offset it applied, committed with its state, and skips what it
reads again; payment's ledger stage does the same with its requests.
"""

from __future__ import annotations

from decimal import Decimal

from schemas.topics import LEDGER_REQUESTS, STOCK_REQUESTS
from services.common.processor import Incoming, TaskContext
from services.common.state import KeyedStore
from services.inventory.app import InventoryApp
from services.inventory.domain import SkuStock, StockOperation, StockRequest, sku_key
from services.inventory.settings import InventorySettings
from services.payment.app import build_app as build_payment
from services.payment.app import customer_key
from services.payment.domain import CustomerLedger, LedgerOperation, LedgerRequest
from services.payment.settings import PaymentSettings


def feed(app: InventoryApp, store: KeyedStore, offset: int, request: StockRequest) -> TaskContext:
    task = TaskContext(0, InventorySettings(partitions=1, topic_prefix=""), app.name, store)
    key = request.sku.encode()
    app.process(task, Incoming(STOCK_REQUESTS, 0, offset, key, request.model_dump_json().encode(), 0))
    return task


def test_a_hold_and_its_commit_read_again_after_shipping_change_nothing() -> None:
    # Given a SKU that held and shipped 2 for o-1
    app, store = InventoryApp({"WIDGET-1": 10}), KeyedStore()
    hold = StockRequest(operation=StockOperation.HOLD, sku="WIDGET-1", order_id="o-1", quantity=2)
    close = StockRequest(operation=StockOperation.COMMIT, sku="WIDGET-1", order_id="o-1")
    for offset, request in enumerate((hold, close)):
        feed(app, store, offset, request)
    settled = store.get(sku_key("WIDGET-1"), SkuStock)
    assert settled is not None
    assert settled.available == 8

    # When the same records are read again from a rewound offset
    replies = [feed(app, store, offset, request).outbox for offset, request in enumerate((hold, close))]

    # Then nothing moves and nothing is answered again
    assert store.get(sku_key("WIDGET-1"), SkuStock) == settled
    assert replies == [[], []]

    # And a new request after them is still applied
    later = StockRequest(operation=StockOperation.HOLD, sku="WIDGET-1", order_id="o-2", quantity=1)
    assert feed(app, store, 2, later).outbox
    after = store.get(sku_key("WIDGET-1"), SkuStock)
    assert after is not None
    assert after.available == 7


def test_a_ledger_request_read_again_moves_no_credit() -> None:
    # Given a customer's ledger that held 30.00 for o-1
    settings = PaymentSettings(partitions=1, topic_prefix="")
    app, store = build_payment(settings), KeyedStore()
    customer = "c-1"
    hold = LedgerRequest(operation=LedgerOperation.HOLD, customer_id=customer, order_id="o-1", amount=Decimal("30.00"))
    record = Incoming(LEDGER_REQUESTS, 0, 5, customer.encode(), hold.model_dump_json().encode(), 0)
    first = TaskContext(0, settings, app.name, store)
    app.process(first, record)
    before = store.get(customer_key(customer), CustomerLedger)

    # When the same record is read again
    again = TaskContext(0, settings, app.name, store)
    app.process(again, record)

    # Then the ledger is unchanged and no second reply goes out
    assert first.outbox
    assert not again.outbox
    assert store.get(customer_key(customer), CustomerLedger) == before

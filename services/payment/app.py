"""The payment StreamApp: an order stage (charges, keyed by order) and a ledger stage (credit, keyed by customer).

Both stages run in one consumer group with one changelog; a task holds the orders and the customers
whose keys hash to its partition, and the two stages talk over `payment.ledger-requests` (by
customer) and `payment.ledger-replies` (by order), so each piece of state changes only in its task.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

from pydantic import BaseModel

from schemas.envelope import Source
from schemas.topics import (
    APPROVAL_EVENTS,
    INVENTORY_EVENTS,
    LEDGER_REPLIES,
    LEDGER_REQUESTS,
    PAYMENT_STATE,
    SHIPPING_EVENTS,
    Topic,
)
from services.common.processor import Incoming, KeyedStore, TaskContext
from services.common.saga import apply_once, apply_settled, decode, decode_internal, order_key
from services.payment.domain import CreditLimits, CustomerLedger, LedgerReply, LedgerRequest, PaymentOrder
from services.payment.handlers import ORDER_HANDLERS, on_ledger_reply, on_ledger_request
from services.payment.settings import PaymentSettings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

CUSTOMER_PREFIX = "customer:"


def customer_key(customer_id: str) -> str:
    return f"{CUSTOMER_PREFIX}{customer_id}"


def ledger_balances(store: KeyedStore) -> dict[str, CustomerLedger]:
    """Every customer ledger kept in `store` (one task's state), by customer id."""
    balances: dict[str, CustomerLedger] = {}
    for key in sorted(store.keys()):
        if key.startswith(CUSTOMER_PREFIX):
            ledger = store.get(key, CustomerLedger)
            if ledger is not None:
                balances[ledger.customer_id] = ledger
    return balances


class PaymentApp:
    name = "payment"
    inputs: Sequence[Topic] = (INVENTORY_EVENTS, APPROVAL_EVENTS, SHIPPING_EVENTS, LEDGER_REQUESTS, LEDGER_REPLIES)
    changelog: Topic = PAYMENT_STATE

    def __init__(self, limits: CreditLimits) -> None:
        self.limits = limits

    def process(self, task: TaskContext, message: Incoming) -> None:
        if message.topic == LEDGER_REQUESTS:
            request = decode_internal(task, message, LedgerRequest, "customer_id", lambda body: body.customer_id)
            if request is not None:
                self._apply_ledger_request(task, request)
        elif message.topic == LEDGER_REPLIES:
            reply = decode_internal(task, message, LedgerReply, "order_id", lambda body: body.order_id)
            if reply is not None:
                self._apply_ledger_reply(task, message, reply)
        else:
            envelope = decode(task, message)
            if envelope is not None:
                apply_once(task, envelope, source=Source.PAYMENT, model=PaymentOrder, handlers=ORDER_HANDLERS)

    def tick(self, task: TaskContext, now: datetime) -> None:
        """Nothing is time-driven in payment."""

    def _apply_ledger_request(self, task: TaskContext, request: LedgerRequest) -> None:
        key = customer_key(request.customer_id)
        before = task.store.get(key, CustomerLedger) or CustomerLedger(
            customer_id=request.customer_id, credit_limit=self.limits.of(request.customer_id)
        )
        ledger, reply = on_ledger_request(before, request)
        if ledger is not before:
            task.store.put(key, ledger)
        if reply is not None:
            task.send(LEDGER_REPLIES, reply.order_id, reply.model_dump_json().encode())
            if not reply.held:
                log.info(
                    "credit hold declined",
                    extra={"customer_id": request.customer_id, "order_id": request.order_id, "reason": reply.reason},
                )

    def _apply_ledger_reply(self, task: TaskContext, message: Incoming, reply: LedgerReply) -> None:
        key = order_key(reply.order_id)
        state = task.store.get(key, PaymentOrder)
        if state is None or state.trigger_id is None:
            task.dead_letter(message, f"order_id: no hold was requested for order {reply.order_id!r}")
            return
        # Recorded under the InventoryReserved event, so a redelivered one re-emits the outcome it led to.
        apply_settled(task, state, on_ledger_reply(state, reply), source=Source.PAYMENT, cause_id=state.trigger_id)


def build_app(settings: PaymentSettings) -> PaymentApp:
    return PaymentApp(settings.credit_limits())

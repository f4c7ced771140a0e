"""The payment StreamApp: an order stage (charges, keyed by order) and a ledger stage (credit, keyed by customer).

A refund goes through the refund provider first; an attempt that fails leaves the order pending and
`tick` retries it with backoff until one succeeds, and only then does the ledger refund the credit.

Both stages run in one consumer group with one changelog; a task holds the orders and the customers
whose keys hash to its partition, and the two stages talk over `payment.ledger-requests` (by
customer) and `payment.ledger-replies` (by order), so each piece of state changes only in its task.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from pydantic import BaseModel

from schemas.envelope import EVENT_ID_NAMESPACE, Envelope, Source
from schemas.events import OrderCompleted, PaymentRefundFailed
from schemas.topics import (
    APPROVAL_EVENTS,
    INVENTORY_EVENTS,
    LEDGER_REPLIES,
    LEDGER_REQUESTS,
    PAYMENT_STATE,
    SHIPPING_EVENTS,
    Topic,
)
from services.common.processor import Incoming, TaskContext
from services.common.saga import (
    apply_once,
    apply_settled,
    decode,
    decode_internal,
    order_key,
    read_again,
    save_order,
)
from services.common.state import KeyedStore
from services.common.tracing import traceparent_of
from services.payment.domain import (
    CreditLimits,
    CustomerLedger,
    LedgerOperation,
    LedgerReply,
    LedgerRequest,
    PaymentOrder,
    Phase,
    RefundRetryIndex,
    Settlement,
)
from services.payment.handlers import on_ledger_reply, on_ledger_request, order_handlers, retry_refund
from services.payment.refunds import LedgerRefunds, RefundAttempt, RefundBackoff, RefundProvider, ScheduledOutages
from services.payment.settings import PaymentSettings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

CUSTOMER_PREFIX = "customer:"
SETTLEMENT_PREFIX = "settlement:"
# Prefixed by none of the above, so it can never collide with an order's, a customer's or a settlement's key.
REFUND_RETRIES_KEY = "payment:refund-retries"


def customer_key(customer_id: str) -> str:
    return f"{CUSTOMER_PREFIX}{customer_id}"


def settlement_key(customer_id: str, order_id: str) -> str:
    """How the customer's hold for the order ended: a key of its own, which expires after one retention
    horizon, so a customer's ledger stays the size of its orders in flight however many it places."""
    return f"{SETTLEMENT_PREFIX}{customer_id}:{order_id}"


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
    in_process: Sequence[Topic] = (LEDGER_REQUESTS, LEDGER_REPLIES)
    mostly_skipped: Sequence[Topic] = ()

    def __init__(
        self,
        limits: CreditLimits,
        *,
        refunds: RefundProvider | None = None,
        backoff: RefundBackoff | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.limits = limits
        self.refunds: RefundProvider = refunds if refunds is not None else LedgerRefunds()
        self.backoff = backoff if backoff is not None else RefundBackoff()
        self.clock = clock
        # The handlers take the time of each attempt; the events they handle do not change.
        self._handled = frozenset(order_handlers(self._attempt(clock())))

    def process(self, task: TaskContext, message: Incoming) -> None:
        if message.topic == LEDGER_REQUESTS:
            if read_again(task, message):
                return
            request = decode_internal(task, message, LedgerRequest, "customer_id", lambda body: body.customer_id)
            if request is not None:
                self._apply_ledger_request(task, request)
        elif message.topic == LEDGER_REPLIES:
            reply = decode_internal(task, message, LedgerReply, "order_id", lambda body: body.order_id)
            if reply is not None:
                self._apply_ledger_reply(task, message, reply)
        else:
            envelope = decode(task, message, handles=self._handled)
            if envelope is None:
                return
            handlers = order_handlers(self._attempt(self.clock()))
            if type(envelope.data) not in handlers:
                return
            if (
                isinstance(envelope.data, OrderCompleted)
                and task.store.get(order_key(envelope.order_id), PaymentOrder) is None
            ):
                return  # completion only finishes a charge payment made; there is nothing to finish here
            apply_once(task, message, envelope, source=Source.PAYMENT, model=PaymentOrder, handlers=handlers)
            state = task.store.get(order_key(envelope.order_id), PaymentOrder)
            if state is None:
                return
            before = _retries(task)
            after = before.tracking(state)
            if state.order_id in after.orders and state.order_id not in before.orders:
                _log_failed_attempt(state)
                _keep_trace(task, message, state)
            _save_retries(task, after, before)

    def tick(self, task: TaskContext, now: datetime) -> None:
        """Retry the refunds whose next attempt is due."""
        stored = index = _retries(task)
        due = index.due(now)
        for order_id in due:
            state = task.store.get(order_key(order_id), PaymentOrder)
            if state is None:
                index = index.without(order_id)
                continue
            with task.tracing.timer(task, order_id, state.traceparent):
                state = self._retry(task, state, now)
            index = index.tracking(state)
        _save_retries(task, index, stored)

    def _attempt(self, now: datetime) -> RefundAttempt:
        return RefundAttempt(provider=self.refunds, backoff=self.backoff, now=now)

    def _retry(self, task: TaskContext, before: PaymentOrder, now: datetime) -> PaymentOrder:
        reaction = retry_refund(before, self._attempt(now))
        retry = before.refund_retry
        if retry is None or not reaction.events:
            return before
        # Every attempt's events are caused by the compensating event; a failed attempt's id also names its
        # number. Only the refund is recorded under that event (beside the first failure), so a redelivery
        # of it re-emits what the saga goes on from, and a long outage does not grow the order's state.
        cause = uuid.UUID(retry.trigger_id)
        emitted = [
            Envelope.new(
                event,
                order_id=before.order_id,
                source=Source.PAYMENT,
                cause=cause,
                occurred_at=now,
                event_id=refund_failure_id(cause, event.attempt) if isinstance(event, PaymentRefundFailed) else None,
            )
            for event in reaction.events
        ]
        outcome = [e.model_dump_json() for e in emitted if not isinstance(e.data, PaymentRefundFailed)]
        state = reaction.state
        if outcome:
            recorded = [*before.handled.get(retry.trigger_id, []), *outcome]
            state = state.model_copy(update={"handled": {**state.handled, retry.trigger_id: recorded}})
        save_order(task, state)
        for envelope in emitted:
            task.emit(envelope)
        if state.phase is Phase.REFUND_PENDING:
            _log_failed_attempt(state)
        else:
            log.info(
                "refund succeeded after retries",
                extra={"order_id": state.order_id, "failed_attempts": retry.failed_attempts},
            )
        for request in reaction.requests:
            task.send(request.topic, request.key, request.body.model_dump_json().encode())
        return state

    def _apply_ledger_request(self, task: TaskContext, request: LedgerRequest) -> None:
        key = customer_key(request.customer_id)
        before = self._ledger(task, request.customer_id)
        settled_key = settlement_key(request.customer_id, request.order_id)
        past = task.store.get(settled_key, Settlement) if request.operation is LedgerOperation.HOLD else None
        change = on_ledger_request(before, request, past)
        if change.ledger != before:
            task.store.put(key, change.ledger)
        if change.settled is not None:
            task.store.put(settled_key, change.settled, expires_at=task.stream_time_ms + task.retention_ms)
        reply = change.reply
        if reply is not None:
            task.send(LEDGER_REPLIES, reply.order_id, reply.model_dump_json().encode())
            if not reply.held:
                log.debug(
                    "credit hold declined",
                    extra={"customer_id": request.customer_id, "order_id": request.order_id, "reason": reply.reason},
                )

    def _ledger(self, task: TaskContext, customer_id: str) -> CustomerLedger:
        """The customer's ledger; settlements an older version kept inside it move to keys of their own."""
        key = customer_key(customer_id)
        stored = task.store.get(key, CustomerLedger)
        if stored is None:
            return CustomerLedger(customer_id=customer_id, credit_limit=self.limits.of(customer_id))
        for order_id, settlement in stored.settled.items():
            expires_at = (settlement.at_ms or task.stream_time_ms) + task.retention_ms
            task.store.put(settlement_key(customer_id, order_id), settlement, expires_at=expires_at)
        ledger = stored.without_legacy_settlements()
        if ledger is not stored:
            task.store.put(key, ledger)
        return ledger

    def _apply_ledger_reply(self, task: TaskContext, message: Incoming, reply: LedgerReply) -> None:
        key = order_key(reply.order_id)
        state = task.store.get(key, PaymentOrder)
        if state is None or state.trigger_id is None:
            task.dead_letter(message, f"order_id: no hold was requested for order {reply.order_id!r}")
            return
        # Recorded under the InventoryReserved event, so a redelivered one re-emits the outcome it led to.
        apply_settled(task, state, on_ledger_reply(state, reply), source=Source.PAYMENT, cause_id=state.trigger_id)


def refund_failure_id(trigger_id: uuid.UUID, attempt: int) -> uuid.UUID:
    """The id of a retried attempt's PaymentRefundFailed: one per (compensating event, attempt), however often
    the attempt is made. The first attempt's failure has the plain caused-by id of its trigger."""
    return uuid.uuid5(EVENT_ID_NAMESPACE, f"{trigger_id}/{Source.PAYMENT.value}/PaymentRefundFailed/{attempt}")


def _log_failed_attempt(state: PaymentOrder) -> None:
    retry = state.refund_retry
    if retry is not None:
        log.warning(
            "refund attempt failed; will retry",
            extra={
                "order_id": state.order_id,
                "attempt": retry.failed_attempts,
                "retry_at": retry.next_attempt_at.isoformat(),
            },
        )


def _keep_trace(task: TaskContext, message: Incoming, state: PaymentOrder) -> None:
    """Remember the trace of the record whose refund must be retried, for the retries."""
    found = traceparent_of(message.headers)
    if found is not None and state.traceparent is None:
        save_order(task, state.model_copy(update={"traceparent": found}))


NO_RETRIES = RefundRetryIndex()


def _retries(task: TaskContext) -> RefundRetryIndex:
    return task.store.get(REFUND_RETRIES_KEY, RefundRetryIndex) or NO_RETRIES


def _save_retries(task: TaskContext, index: RefundRetryIndex, stored: RefundRetryIndex) -> None:
    """Store `index` if it differs from `stored`, the index as the task read it."""
    if index != stored:
        task.store.put(REFUND_RETRIES_KEY, index)


def refund_provider(settings: PaymentSettings) -> RefundProvider:
    """The provider refunds go through: the ledger itself, unless a drill schedules outages."""
    if settings.payment_refund_outages:
        log.warning(
            "refund outages scheduled (drill)",
            extra={"windows": [window.model_dump(mode="json") for window in settings.payment_refund_outages]},
        )
        return ScheduledOutages(tuple(settings.payment_refund_outages))
    return LedgerRefunds()


def build_app(settings: PaymentSettings) -> PaymentApp:
    return PaymentApp(
        settings.credit_limits(),
        refunds=refund_provider(settings),
        backoff=RefundBackoff(initial=settings.payment_refund_retry_initial, maximum=settings.payment_refund_retry_max),
    )

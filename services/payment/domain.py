"""Payment rules: the per-order charge state, the per-customer credit ledger and their messages.

Pure: no Kafka here. The order stage decides whether an order is charged; the ledger stage owns a
customer's credit and is the only place it changes, so two orders of one customer can never both
spend the same credit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Literal, Self

import msgspec
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from schemas.envelope import describe_validation_error
from schemas.events import OrderDetails
from schemas.primitives import CustomerId, Money
from services.common.saga import OrderState

TEXT_LIMIT = 500
_CUSTOMER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")


def text(value: str) -> str:
    """`value` cut to what a contract `Text` field accepts, so a long upstream reason cannot poison our event."""
    return value if len(value) <= TEXT_LIMIT else value[: TEXT_LIMIT - 1] + "…"


def money(amount: Decimal) -> str:
    return format(amount, "f")


# --- credit configuration -----------------------------------------------------------------------


class CustomerFileError(ValueError):
    """The customers file is unreadable or has an invalid entry; the message names it."""


class _CustomerCredit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    credit_limit: Money


def load_customers(path: Path) -> dict[str, Decimal]:
    """Credit limits by customer id from `{"<customer_id>": {"credit_limit": "<decimal string>"}}`."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CustomerFileError(f"{path}: cannot read the customers file: {error.strerror or error}") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CustomerFileError(f"{path}: not JSON: {error}") from error
    if not isinstance(document, dict):
        raise CustomerFileError(f"{path}: expected an object of customers, got {type(document).__name__}")
    limits: dict[str, Decimal] = {}
    for customer_id, entry in document.items():
        if len(customer_id) > 64 or _CUSTOMER_ID.fullmatch(customer_id) is None:
            raise CustomerFileError(f"{path}: customer {customer_id!r}: not a valid customer id")
        try:
            limits[customer_id] = _CustomerCredit.model_validate(entry).credit_limit
        except ValidationError as error:
            raise CustomerFileError(f"{path}: customer {customer_id!r}: {describe_validation_error(error)}") from error
    return limits


@dataclass(frozen=True)
class CreditLimits:
    default: Decimal
    customers: dict[str, Decimal] = field(default_factory=dict)

    def of(self, customer_id: str) -> Decimal:
        return self.customers.get(customer_id, self.default)


# --- internal messages (order stage <-> ledger stage) -------------------------------------------


class LedgerOperation(StrEnum):
    HOLD = "hold"
    RELEASE = "release"
    REFUND = "refund"
    FINALIZE = "finalize"  # the order completed: its charge stands for good and leaves the open holds


class LedgerRequest(BaseModel):
    """Topic `payment.ledger-requests`, key customer_id: change one customer's credit for one order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operation: LedgerOperation
    customer_id: CustomerId
    order_id: str = Field(min_length=1, max_length=64)
    amount: Money = Decimal(0)


class LedgerReply(BaseModel):
    """Topic `payment.ledger-replies`, key order_id: the answer to a hold (releases and refunds cannot fail)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    order_id: str = Field(min_length=1, max_length=64)
    customer_id: CustomerId
    held: bool
    amount: Money
    reason: str | None = None


# --- ledger stage: one customer's credit ----------------------------------------------------------


class Settlement(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """How a customer's hold for one order ended, kept for one retention horizon under a key of its own, so
    a repeated request answers as the first and the ledger itself follows only the orders in flight.

    `at_ms` is when a ledger written before settlements had keys of their own settled it (stream time);
    0 since.
    """

    outcome: Literal["declined", "released", "refunded", "charged"]
    amount: Decimal
    reason: str | None = None
    at_ms: int = 0


@dataclass(frozen=True)
class LedgerChange:
    """What one request does: the ledger after it, the answer to a hold, and the order's settlement if it
    settled now."""

    ledger: CustomerLedger
    reply: LedgerReply | None = None
    settled: Settlement | None = None


class CustomerLedger(msgspec.Struct, frozen=True, kw_only=True):
    """Invariants: 0 <= used <= credit_limit; used == sum(holds) + finalized_total;
    charged_total - refunded_total == used.

    `holds` are the charges of orders still in flight, which a release or a refund may take back; a
    completed order's charge moves to `finalized_total` (it keeps using credit), so the ledger follows the
    customer's orders in flight, not every order the customer ever completed. How a hold ended is a
    `Settlement` the caller keeps beside the ledger and hands back to `hold`. `settled` holds the
    settlements of a ledger written before they had keys of their own: moved out when it is next read.

    A Struct rather than a model: it is read, changed and stored on every request of the customer's orders.
    """

    customer_id: str
    credit_limit: Decimal
    used: Decimal = Decimal(0)
    charged_total: Decimal = Decimal(0)
    refunded_total: Decimal = Decimal(0)
    finalized_total: Decimal = Decimal(0)
    holds: dict[str, Decimal] = msgspec.field(default_factory=dict)
    settled: dict[str, Settlement] = msgspec.field(default_factory=dict)

    @property
    def available(self) -> Decimal:
        return self.credit_limit - self.used

    def hold(self, order_id: str, amount: Decimal, past: Settlement | None = None) -> LedgerChange:
        """Hold `amount` for the order; `past` is how an earlier hold of the same order ended, if one did."""
        if order_id in self.holds:
            return LedgerChange(self, self._reply(order_id, self.holds[order_id], held=True))
        if past is not None:
            reason = past.reason if past.outcome == "declined" else f"hold already {past.outcome}"
            return LedgerChange(self, self._reply(order_id, past.amount, held=False, reason=reason))
        if self.used + amount > self.credit_limit:
            reason = f"credit limit exceeded: available {money(self.available)}"
            declined = Settlement(outcome="declined", amount=amount, reason=reason)
            return LedgerChange(self, self._reply(order_id, amount, held=False, reason=reason), declined)
        # The order stage charges exactly when a hold succeeds (unless the order was cancelled, and
        # then it releases), so a granted hold counts as charged until released or refunded.
        ledger = msgspec.structs.replace(
            self,
            used=self.used + amount,
            charged_total=self.charged_total + amount,
            holds={**self.holds, order_id: amount},
        )
        return LedgerChange(ledger, self._reply(order_id, amount, held=True))

    def release(self, order_id: str) -> LedgerChange:
        """Undo an authorization that was never charged; releasing an unknown hold changes nothing."""
        amount = self.holds.get(order_id)
        if amount is None:
            return LedgerChange(self)
        return self._close(
            order_id, amount, "released", used=self.used - amount, charged_total=self.charged_total - amount
        )

    def refund(self, order_id: str) -> LedgerChange:
        amount = self.holds.get(order_id)
        if amount is None:
            return LedgerChange(self)
        return self._close(
            order_id, amount, "refunded", used=self.used - amount, refunded_total=self.refunded_total + amount
        )

    def finalize(self, order_id: str) -> LedgerChange:
        """The order completed: its hold leaves the ledger, its amount stays used; an unknown hold changes nothing."""
        amount = self.holds.get(order_id)
        if amount is None:
            return LedgerChange(self)
        return self._close(order_id, amount, "charged", finalized_total=self.finalized_total + amount)

    def without_legacy_settlements(self) -> CustomerLedger:
        return msgspec.structs.replace(self, settled={}) if self.settled else self

    def _close(
        self, order_id: str, amount: Decimal, outcome: Literal["released", "refunded", "charged"], **totals: Decimal
    ) -> LedgerChange:
        """The hold leaves the ledger, settled with `outcome`; `totals` say how the sums move."""
        holds = {key: value for key, value in self.holds.items() if key != order_id}
        ledger = msgspec.structs.replace(self, holds=holds, **totals)
        return LedgerChange(ledger, settled=Settlement(outcome=outcome, amount=amount))

    def _reply(self, order_id: str, amount: Decimal, *, held: bool, reason: str | None = None) -> LedgerReply:
        return LedgerReply(order_id=order_id, customer_id=self.customer_id, held=held, amount=amount, reason=reason)


# --- order stage: one order's charge ------------------------------------------------------------


class Phase(StrEnum):
    AWAITING = "awaiting"  # InventoryReserved not seen yet
    HOLDING = "holding"  # hold sent, no answer yet
    CHARGED = "charged"
    REFUND_PENDING = "refund_pending"  # a refund is due and its last attempt failed; retried until one succeeds
    DECLINED = "declined"
    REFUNDED = "refunded"
    VOIDED = "voided"  # cancelled before any charge


class RefundRetry(BaseModel):
    """A refund whose attempts failed so far; kept after it succeeds, as the record of how many it took."""

    model_config = ConfigDict(frozen=True)

    # The compensating event that made the refund due: every retry's events are caused by and recorded under it.
    trigger_id: str
    reason: str
    failed_attempts: int = Field(ge=1)
    next_attempt_at: AwareDatetime


class PaymentOrder(OrderState):
    phase: Phase = Phase.AWAITING
    order: OrderDetails | None = None
    amount: Decimal | None = None
    # Outcomes decided by a ledger reply are caused by (and recorded under) the InventoryReserved event.
    trigger_id: str | None = None
    # A hold was sent and not answered yet; once answered, a further reply is a duplicate.
    hold_pending: bool = False
    closed_reason: str | None = None
    refund_retry: RefundRetry | None = None
    completed: bool = False
    """OrderCompleted was seen: the charge stands for good."""
    traceparent: str | None = None
    """W3C trace context of the record whose refund failed first: the retries join the order's trace through it."""

    def finished(self) -> bool:
        if self.hold_pending:
            return False
        return self.phase in _CLOSED or (self.phase is Phase.CHARGED and self.completed)

    def pending(self) -> bool:
        # Money held or charged and still refundable, or a refund to retry: never forgotten.
        return self.hold_pending or (self.phase in _OPEN_MONEY and not self.finished())

    def marker(self) -> Self:
        return super().marker().model_copy(update={"order": None})


_CLOSED = frozenset({Phase.DECLINED, Phase.REFUNDED, Phase.VOIDED})
_OPEN_MONEY = frozenset({Phase.HOLDING, Phase.CHARGED, Phase.REFUND_PENDING})


class RefundRetryIndex(BaseModel):
    """Orders of one task waiting to retry a refund, with when, so a tick never scans every order."""

    model_config = ConfigDict(frozen=True)

    orders: dict[str, AwareDatetime] = Field(default_factory=dict)

    def due(self, now: datetime) -> list[str]:
        return sorted(order_id for order_id, at in self.orders.items() if at <= now)

    def tracking(self, state: PaymentOrder) -> RefundRetryIndex:
        index = self.without(state.order_id)
        if state.phase is Phase.REFUND_PENDING and state.refund_retry is not None:
            return RefundRetryIndex(orders={**index.orders, state.order_id: state.refund_retry.next_attempt_at})
        return index

    def without(self, order_id: str) -> RefundRetryIndex:
        if order_id not in self.orders:
            return self
        return RefundRetryIndex(orders={key: value for key, value in self.orders.items() if key != order_id})

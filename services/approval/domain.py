"""Approval's rules: when a human must decide, which decision counts, and when time runs out.

The rules are pure functions of the order's approval state, so the stream side and the reviewer
API (which answers 404/409 before it publishes a decision) apply the same ones. The stream side
rules last: a decision the API let through can still be ignored if another one won meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.events import OrderDetails
from schemas.primitives import Money
from services.common.saga import OrderState

SYSTEM_REVIEWER = "system"
BELOW_THRESHOLD = "below threshold"
APPROVED_BY_REVIEWER = "approved by reviewer"

DEADLINES_KEY = "deadlines"
"""State key of the task's index of pending approvals (see `DeadlineIndex`)."""


class ApprovalStatus(StrEnum):
    AWAITING_PAYMENT = "awaiting_payment"
    """No charge seen yet, so nothing to approve."""
    PENDING = "pending"
    GRANTED = "granted"
    DENIED = "denied"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    """The order was cancelled while a reviewer's decision was pending."""


CLOSED = frozenset({ApprovalStatus.GRANTED, ApprovalStatus.DENIED, ApprovalStatus.TIMED_OUT, ApprovalStatus.CANCELLED})


class ApprovalState(OrderState):
    status: ApprovalStatus = ApprovalStatus.AWAITING_PAYMENT
    cancelled: bool = False
    """A cancellation was requested, whatever the status then: a later charge is not approved."""
    order: OrderDetails | None = None
    amount: Money | None = None
    currency: str | None = None
    requested_event_id: str | None = None
    """Id of ApprovalRequested: the cause of the escalation and the timeout."""
    requested_at: AwareDatetime | None = None
    escalate_at: AwareDatetime | None = None
    deadline: AwareDatetime | None = None
    escalated: bool = False
    reviewer: str | None = None
    comment: str | None = None
    decision_event_id: str | None = None
    closed_at: AwareDatetime | None = None
    traceparent: str | None = None
    """W3C trace context of the record that made the approval pending: the reviewer's decision (over HTTP)
    and the timers join the order's trace through it."""

    def finished(self) -> bool:
        return self.status in CLOSED or (self.cancelled and self.status is ApprovalStatus.AWAITING_PAYMENT)

    def pending(self) -> bool:
        # A reviewer's decision or the deadline is still to come.
        return self.status is ApprovalStatus.PENDING

    def marker(self) -> Self:
        if self.requested_event_id is not None:
            # A reviewed approval stays whole in the reviewers' history until the horizon.
            return super().marker()
        return super().marker().model_copy(update={"order": None})


@dataclass(frozen=True)
class ApprovalPolicy:
    default_threshold: Decimal
    """The threshold of every currency `thresholds` does not list."""
    timeout: timedelta
    escalation_fraction: float
    thresholds: Mapping[str, Decimal] = field(default_factory=dict)
    """Per currency: an amount is only comparable with a threshold in its own currency."""

    def threshold(self, currency: str) -> Decimal:
        return self.thresholds.get(currency, self.default_threshold)

    def needs_review(self, amount: Decimal, currency: str) -> bool:
        return amount >= self.threshold(currency)

    def deadline(self, requested_at: datetime) -> datetime:
        return requested_at + self.timeout

    def escalation_at(self, requested_at: datetime) -> datetime:
        return requested_at + self.timeout * self.escalation_fraction


class Problem(StrEnum):
    """Why a decision cannot be accepted, in terms an HTTP layer maps to a status code."""

    NOT_FOUND = "not_found"
    """No approval exists for the order (404)."""
    CONFLICT = "conflict"
    """The approval exists but accepts no decision any more (409)."""


@dataclass(frozen=True)
class Ruling:
    problem: Problem | None = None
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.problem is None


ACCEPTED = Ruling()


def rule_on_decision(state: ApprovalState | None, submitted_at: datetime) -> Ruling:
    """Whether a decision submitted at `submitted_at` would decide the approval; the first accepted one wins."""
    if state is None or (state.status is ApprovalStatus.AWAITING_PAYMENT and not state.cancelled):
        return Ruling(Problem.NOT_FOUND, "no approval has been requested for this order")
    closed = _closed_reason(state)
    if closed is not None:
        return Ruling(Problem.CONFLICT, closed)
    if state.deadline is not None and submitted_at >= state.deadline:
        return Ruling(Problem.CONFLICT, f"submitted after the deadline {state.deadline.isoformat()}")
    return ACCEPTED


def _closed_reason(state: ApprovalState) -> str | None:
    if state.cancelled:
        return "the order was cancelled"
    if state.status is ApprovalStatus.GRANTED:
        return f"the approval was already granted by {state.reviewer}"
    if state.status is ApprovalStatus.DENIED:
        return f"the approval was already denied by {state.reviewer}"
    if state.status is ApprovalStatus.TIMED_OUT:
        return "the approval timed out"
    return None


def next_timer(state: ApprovalState) -> datetime | None:
    """When the approval next needs a tick: its escalation point, then its deadline; None once closed."""
    if state.status is not ApprovalStatus.PENDING or state.deadline is None:
        return None
    if not state.escalated and state.escalate_at is not None and state.escalate_at < state.deadline:
        return state.escalate_at
    return state.deadline


class DeadlineIndex(BaseModel):
    """The task's pending approvals and when each next needs attention, kept beside the order states.

    A tick reads this one document instead of decoding every order the task ever saw. It changes in
    the same transaction as the order state it mirrors, so the changelog restores both consistently.
    """

    model_config = ConfigDict(frozen=True)

    timers: dict[str, AwareDatetime] = Field(default_factory=dict)

    def track(self, state: ApprovalState) -> DeadlineIndex:
        due = next_timer(state)
        if due == self.timers.get(state.order_id):
            return self
        timers = {order_id: at for order_id, at in self.timers.items() if order_id != state.order_id}
        if due is not None:
            timers[state.order_id] = due
        return DeadlineIndex(timers=timers)

    def forget(self, order_id: str) -> DeadlineIndex:
        return DeadlineIndex(timers={key: at for key, at in self.timers.items() if key != order_id})

    def due(self, now: datetime) -> list[str]:
        return sorted(order_id for order_id, at in self.timers.items() if at <= now)

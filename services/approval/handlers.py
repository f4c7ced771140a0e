"""Approval's reactions: pure functions `(state, envelope) -> Reaction`, and the timer step `(state, now)`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from functools import partial
from typing import TypeVar

from schemas.envelope import Envelope, Source
from schemas.events import (
    ApprovalDecisionIgnored,
    ApprovalDecisionSubmitted,
    ApprovalDenied,
    ApprovalEscalated,
    ApprovalGranted,
    ApprovalRequested,
    ApprovalTimedOut,
    Event,
    OrderCancellationRequested,
    PaymentCharged,
)
from services.approval.domain import (
    APPROVED_BY_REVIEWER,
    BELOW_THRESHOLD,
    SYSTEM_REVIEWER,
    ApprovalPolicy,
    ApprovalState,
    ApprovalStatus,
    rule_on_decision,
)
from services.common.saga import Handler, Reaction, payload

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)


def on_payment_charged(policy: ApprovalPolicy, state: ApprovalState, envelope: Envelope) -> Reaction[ApprovalState]:
    if state.cancelled or state.status is not ApprovalStatus.AWAITING_PAYMENT:
        log.info("charge ignored", extra={"order_id": state.order_id, "status": state.status.value})
        return Reaction(state)
    charged = payload(envelope, PaymentCharged)
    common = {"order": charged.order, "amount": charged.amount, "currency": charged.currency}
    if not policy.needs_review(charged.amount, charged.currency):
        granted = ApprovalGranted(order=charged.order, reviewer=SYSTEM_REVIEWER, reason=BELOW_THRESHOLD)
        update = {
            **common,
            "status": ApprovalStatus.GRANTED,
            "reviewer": SYSTEM_REVIEWER,
            "closed_at": envelope.occurred_at,
        }
        return Reaction(state.model_copy(update=update), events=(granted,))
    requested_at = envelope.occurred_at
    deadline = policy.deadline(requested_at)
    requested = ApprovalRequested(
        order=charged.order, amount=charged.amount, currency=charged.currency, deadline=deadline
    )
    update = {
        **common,
        "status": ApprovalStatus.PENDING,
        # The id apply_once will give the event: timers name it as their cause.
        "requested_event_id": str(envelope.caused(requested, Source.APPROVAL).event_id),
        "requested_at": requested_at,
        "escalate_at": policy.escalation_at(requested_at),
        "deadline": deadline,
    }
    return Reaction(state.model_copy(update=update), events=(requested,))


def on_decision_submitted(state: ApprovalState, envelope: Envelope) -> Reaction[ApprovalState]:
    decision = payload(envelope, ApprovalDecisionSubmitted)
    # The submission time rules, not the processing time: a decision made in time is not lost to consumer lag.
    ruling = rule_on_decision(state, envelope.occurred_at)
    if not ruling.accepted:
        ignored = ApprovalDecisionIgnored(
            decision_event_id=str(envelope.event_id), reviewer=decision.reviewer, reason=ruling.reason
        )
        return Reaction(state, events=(ignored,))
    assert state.order is not None  # a pending approval always carries its order
    outcome: Event
    if decision.approved:
        outcome = ApprovalGranted(
            order=state.order, reviewer=decision.reviewer, reason=APPROVED_BY_REVIEWER, comment=decision.comment
        )
    else:
        outcome = ApprovalDenied(reviewer=decision.reviewer, comment=decision.comment)
    update = {
        "status": ApprovalStatus.GRANTED if decision.approved else ApprovalStatus.DENIED,
        "reviewer": decision.reviewer,
        "comment": decision.comment,
        "decision_event_id": str(envelope.event_id),
        "closed_at": envelope.occurred_at,
    }
    return Reaction(state.model_copy(update=update), events=(outcome,))


def on_cancellation_requested(state: ApprovalState, envelope: Envelope) -> Reaction[ApprovalState]:
    if state.cancelled:
        return Reaction(state)
    if state.status is ApprovalStatus.PENDING:
        # Closing here stops the timers; shipping answers the client and starts the compensation.
        update = {"status": ApprovalStatus.CANCELLED, "cancelled": True, "closed_at": envelope.occurred_at}
        return Reaction(state.model_copy(update=update))
    return Reaction(state.model_copy(update={"cancelled": True}))


def on_tick(state: ApprovalState, now: datetime) -> Reaction[ApprovalState]:
    """Time out a pending approval at its deadline, or escalate it once past its escalation point.

    After a long pause (the service was down) both may be due: only the timeout fires, as
    escalating an approval that is already over would only page a reviewer for nothing.
    """
    if state.status is not ApprovalStatus.PENDING or state.deadline is None:
        return Reaction(state)
    if now >= state.deadline:
        update = {"status": ApprovalStatus.TIMED_OUT, "closed_at": now}
        return Reaction(state.model_copy(update=update), events=(ApprovalTimedOut(deadline=state.deadline),))
    if not state.escalated and state.escalate_at is not None and now >= state.escalate_at:
        return Reaction(
            state.model_copy(update={"escalated": True}), events=(ApprovalEscalated(deadline=state.deadline),)
        )
    return Reaction(state)


def handlers(policy: ApprovalPolicy) -> Mapping[type[Event], Handler[ApprovalState]]:
    """Every event approval reacts to; any other event on its inputs (OrderPlaced, other payment events) is ignored."""
    return {
        PaymentCharged: partial(on_payment_charged, policy),
        ApprovalDecisionSubmitted: on_decision_submitted,
        OrderCancellationRequested: on_cancellation_requested,
    }

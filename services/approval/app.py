"""Approval's StreamApp and its wiring."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime

from prometheus_client.registry import Collector

from schemas.envelope import Envelope, Source
from schemas.events import ApprovalDecisionSubmitted, ApprovalTimedOut
from schemas.topics import APPROVAL_DECISIONS, APPROVAL_STATE, ORDERS, PAYMENT_EVENTS, Topic
from services.approval.domain import DEADLINES_KEY, ApprovalPolicy, ApprovalState, ApprovalStatus, DeadlineIndex
from services.approval.handlers import handlers, on_tick
from services.approval.metrics import APPROVED, DENIED, IGNORED, TIMED_OUT, ApprovalMetrics
from services.approval.settings import ApprovalSettings
from services.common.processor import Incoming, TaskContext
from services.common.saga import apply_once, decode, order_key, save_order
from services.common.tracing import traceparent_of

log = logging.getLogger(__name__)


class ApprovalApp:
    name: str = "approval"
    inputs: Sequence[Topic] = (PAYMENT_EVENTS, APPROVAL_DECISIONS, ORDERS)
    changelog: Topic = APPROVAL_STATE
    in_process: Sequence[Topic] = ()
    # Read for cancellation requests; most of what arrives there is orders placed.
    mostly_skipped: Sequence[Topic] = (ORDERS,)

    def __init__(self, policy: ApprovalPolicy, metrics: ApprovalMetrics | None = None) -> None:
        self.policy = policy
        self._handlers = handlers(policy)
        self.metrics = metrics if metrics is not None else ApprovalMetrics()

    def collectors(self) -> Sequence[Collector]:
        return self.metrics.collectors()

    def process(self, task: TaskContext, message: Incoming) -> None:
        envelope = decode(task, message, handles=self._handlers)
        if envelope is None or type(envelope.data) not in self._handlers:
            return
        before = task.store.get(order_key(envelope.order_id), ApprovalState)
        apply_once(task, message, envelope, source=Source.APPROVAL, model=ApprovalState, handlers=self._handlers)
        state = task.store.get(order_key(envelope.order_id), ApprovalState)
        if state is not None:
            _keep_trace(task, message, state)
            _save_index(task, _index(task).track(state))
            if isinstance(envelope.data, ApprovalDecisionSubmitted):
                self._count_decision(task, str(envelope.event_id), before, state)

    def _count_decision(
        self, task: TaskContext, event_id: str, before: ApprovalState | None, after: ApprovalState
    ) -> None:
        """Count a decision ruled on now (not a redelivery of one ruled on before, nor one dead-lettered)."""
        if (before is not None and event_id in before.handled) or event_id not in after.handled:
            return
        if after.decision_event_id != event_id:
            decision = IGNORED
        else:
            decision = APPROVED if after.status is ApprovalStatus.GRANTED else DENIED
        task.after_commit(self.metrics.decided(decision))

    def tick(self, task: TaskContext, now: datetime) -> None:
        index = _index(task)
        due = index.due(now)
        for order_id in due:
            key = order_key(order_id)
            state = task.store.get(key, ApprovalState)
            if state is None:
                index = index.forget(order_id)
                continue
            with task.tracing.timer(task, order_id, state.traceparent):
                reaction = on_tick(state, now)
                if reaction.state != state:
                    save_order(task, reaction.state)
                for event in reaction.events:
                    if isinstance(event, ApprovalTimedOut):
                        task.after_commit(self.metrics.decided(TIMED_OUT))
                    cause = uuid.UUID(state.requested_event_id) if state.requested_event_id else None
                    envelope = Envelope.new(
                        event, order_id=order_id, source=Source.APPROVAL, cause=cause, occurred_at=now
                    )
                    task.emit(envelope)
                    log.info("approval timer fired", extra={"order_id": order_id, "event": type(event).__name__})
            index = index.track(reaction.state)
        if due:
            _save_index(task, index)


def _keep_trace(task: TaskContext, message: Incoming, state: ApprovalState) -> None:
    """Remember the trace of the record that made the approval pending, for the decision and the timers."""
    if not state.pending() or state.traceparent is not None:
        return
    found = traceparent_of(message.headers)
    if found is not None:
        save_order(task, state.model_copy(update={"traceparent": found}))


def _index(task: TaskContext) -> DeadlineIndex:
    return task.store.get(DEADLINES_KEY, DeadlineIndex) or DeadlineIndex()


def _save_index(task: TaskContext, index: DeadlineIndex) -> None:
    if index != _index(task):
        task.store.put(DEADLINES_KEY, index)


def build_app(settings: ApprovalSettings) -> ApprovalApp:
    return ApprovalApp(
        ApprovalPolicy(
            default_threshold=settings.approval_threshold,
            thresholds=dict(settings.approval_thresholds),
            timeout=settings.approval_timeout,
            escalation_fraction=settings.approval_escalation_fraction,
        )
    )

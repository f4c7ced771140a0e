"""The audit StreamApp: every saga event, once, in causal order per order, on the audit topic."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from msgspec.structs import replace
from prometheus_client.registry import Collector

from schemas.envelope import Envelope
from schemas.events import OrderPlaced
from schemas.topics import AUDIT, AUDIT_STATE, SAGA_TOPICS, Topic
from services.audit.domain import HELD_INDEX_KEY, AuditOrderState, HeldIndex, Outcome, arrival, rejection_of
from services.audit.handlers import on_event, on_tick
from services.audit.metrics import AuditMetrics
from services.audit.settings import AuditSettings
from services.common.processor import Incoming, TaskContext
from services.common.saga import decode, forgotten, order_key
from services.common.settings import ChoreoSettings
from services.common.tracing import traceparent_of

log = logging.getLogger(__name__)


class AuditApp:
    name = "audit"
    inputs: Sequence[Topic] = SAGA_TOPICS
    changelog = AUDIT_STATE
    in_process: Sequence[Topic] = ()
    mostly_skipped: Sequence[Topic] = ()

    def __init__(
        self,
        causal_wait: timedelta,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: AuditMetrics | None = None,
    ) -> None:
        self.causal_wait = causal_wait
        self.clock = clock
        self.metrics = metrics if metrics is not None else AuditMetrics()
        # After a restart the backlog may still hold the causes we wait for, so the wait counts
        # from when this process started working on the task, not only from when the event was held.
        self._active_since: dict[int, datetime] = {}

    def process(self, task: TaskContext, message: Incoming) -> None:
        envelope = decode(task, message, rejected=lambda reason: self._reject(task, message, reason))
        if envelope is not None:
            self._audit(task, message, envelope, message.value)

    def _reject(self, task: TaskContext, message: Incoming, reason: str) -> None:
        """Put a client's invalid command on its order's timeline, when its key names an order."""
        where = (message.topic.name, message.partition, message.offset)
        rejection = rejection_of(*where, key=message.key, value=message.value, reason=reason)
        if rejection is not None:
            self._audit(task, message, rejection, rejection.to_bytes())

    def _audit(self, task: TaskContext, message: Incoming, envelope: Envelope, raw: bytes | None) -> None:
        now = self.clock()
        self._active_since.setdefault(task.partition, now)
        known = task.store.get(order_key(envelope.order_id), AuditOrderState)
        if known is None and forgotten(task, message, envelope):
            return
        state = known or AuditOrderState(order_id=envelope.order_id)
        held = arrival(envelope, raw, now, traceparent=traceparent_of(message.headers))
        outcome = on_event(state, held, message.topic.name)
        if outcome.duplicate:
            log.debug("duplicate event not written again", extra={"event_id": str(envelope.event_id)})
            return
        self._apply(task, state, outcome)

    def collectors(self) -> Sequence[Collector]:
        return self.metrics.collectors()

    def tick(self, task: TaskContext, now: datetime) -> None:
        started = self._active_since.setdefault(task.partition, now)
        if now - started < self.causal_wait:
            return
        index = task.store.get(HELD_INDEX_KEY, HeldIndex)
        if index is None:
            return
        for order_id, oldest in sorted(index.orders.items(), key=lambda item: item[1]):
            if now - oldest < self.causal_wait:
                continue
            state = task.store.get(order_key(order_id), AuditOrderState)
            if state is None or not state.held:
                self._forget(task, order_id)
                continue
            outcome = on_tick(state, now, self.causal_wait)
            if not outcome.written:
                continue
            for event in outcome.forced:
                log.warning(
                    "cause never arrived; event written without it",
                    extra={
                        "order_id": order_id,
                        "event_id": event.event_id,
                        "type": event.type,
                        "causation_id": event.causation_id,
                        "waited_s": (now - event.held_since).total_seconds(),
                    },
                )
            # Written by the clock, in the trace of the first event forced out.
            with task.tracing.timer(task, order_id, outcome.forced[0].traceparent if outcome.forced else None):
                self._apply(task, state, outcome)

    def _apply(self, task: TaskContext, before: AuditOrderState, outcome: Outcome) -> None:
        state = outcome.state
        for event in outcome.written:
            # The record's own bytes, not a re-serialization: the audit shows exactly what was published.
            task.send(AUDIT, state.order_id, event.raw.encode())
        if outcome.written:
            written, placed_at = outcome.written, before.placed_at
            task.after_commit(lambda: self.metrics.written(written, placed_at))
            placed = [event.occurred_at for event in written if event.type == OrderPlaced.__name__]
            if placed and not state.closed:
                state = replace(state, placed_at=placed[0])
        # An order holding events waits for their causes; any other is forgotten one horizon after its
        # latest event (it is already as small as a marker: the ids written, no events).
        expires_at = None if state.held else task.stream_time_ms + task.retention_ms
        task.store.put(order_key(state.order_id), state, expires_at=expires_at)
        if before.held or state.held:
            index = task.store.get(HELD_INDEX_KEY, HeldIndex) or HeldIndex()
            updated = index.updated(state)
            if updated != index:
                task.store.put(HELD_INDEX_KEY, updated)

    def _forget(self, task: TaskContext, order_id: str) -> None:
        index = task.store.get(HELD_INDEX_KEY, HeldIndex) or HeldIndex()
        task.store.put(HELD_INDEX_KEY, index.updated(AuditOrderState(order_id=order_id)))


def build_app(settings: ChoreoSettings) -> AuditApp:
    if isinstance(settings, AuditSettings):
        return AuditApp(causal_wait=settings.audit_causal_wait)
    default: timedelta = AuditSettings.model_fields["audit_causal_wait"].default
    return AuditApp(causal_wait=default)

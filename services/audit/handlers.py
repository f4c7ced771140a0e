"""Pure reactions of the audit: an event arrives, or time passes."""

from __future__ import annotations

from datetime import datetime, timedelta

from services.audit.domain import AuditOrderState, HeldEvent, Outcome, chain_root, write_with_consequences


def on_event(state: AuditOrderState, event: HeldEvent) -> Outcome:
    """Write the event once, and only after its cause; otherwise hold it until the cause is written."""
    if state.seen(event.event_id):
        return Outcome(state=state, duplicate=True)
    if event.causation_id is None or event.causation_id in state.written:
        return write_with_consequences(state, [event])
    return Outcome(state=state.model_copy(update={"held": {**state.held, event.event_id: event}}))


def on_tick(state: AuditOrderState, now: datetime, wait: timedelta) -> Outcome:
    """Write what waited longer than `wait` for a cause that never came, oldest ancestor first.

    Starting from the earliest held ancestor keeps the part of the chain that did arrive causal.
    """
    overdue = sorted((event for event in state.held.values() if now - event.held_since >= wait), key=_order)
    roots: dict[str, HeldEvent] = {}
    for event in overdue:
        root = chain_root(state, event)
        roots.setdefault(root.event_id, root)
    if not roots:
        return Outcome(state=state)
    outcome = write_with_consequences(state, roots.values())
    return Outcome(state=outcome.state, written=outcome.written, forced=tuple(roots.values()))


def _order(event: HeldEvent) -> tuple[datetime, str, str]:
    return event.order

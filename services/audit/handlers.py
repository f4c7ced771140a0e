"""Pure reactions of the audit: an event arrives, or time passes."""

from __future__ import annotations

from datetime import datetime, timedelta

from msgspec.structs import replace

from services.audit.domain import AuditOrderState, HeldEvent, Outcome, chain_root, write_with_consequences


def on_event(state: AuditOrderState, event: HeldEvent, topic: str) -> Outcome:
    """Write the event once, after its cause and the order's previous event on `topic`; else hold it."""
    if state.seen(event.event_id):
        return Outcome(state=state, duplicate=True)
    event = replace(event, after=state.last_by_topic.get(topic))
    state = replace(state, last_by_topic={**state.last_by_topic, topic: event.event_id})
    if state.ready(event):
        return write_with_consequences(state, [event])
    return Outcome(state=replace(state, held={**state.held, event.event_id: event}))


def on_tick(state: AuditOrderState, now: datetime, wait: timedelta) -> Outcome:
    """Write what waited longer than `wait` for something that never came, oldest ancestor first.

    Starting from the earliest held ancestor keeps the part of the chain that did arrive causal;
    it repeats until nothing overdue is held, since an event may wait for two missing ones.
    """
    written: list[HeldEvent] = []
    forced: list[HeldEvent] = []
    while True:
        overdue = sorted((event for event in state.held.values() if now - event.held_since >= wait), key=_order)
        roots: dict[str, HeldEvent] = {}
        for event in overdue:
            root = chain_root(state, event)
            roots.setdefault(root.event_id, root)
        if not roots:
            return Outcome(state=state, written=tuple(written), forced=tuple(forced))
        outcome = write_with_consequences(state, roots.values())
        state = outcome.state
        written.extend(outcome.written)
        forced.extend(roots.values())


def _order(event: HeldEvent) -> tuple[datetime, str, str]:
    return event.order

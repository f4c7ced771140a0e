"""The audit's per-order state and the rules that keep its output causal and free of duplicates.

No Kafka here: the app turns records into `Arrival`s and writes what these rules release.
"""

from __future__ import annotations

import heapq
import itertools
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

import msgspec
from pydantic import ValidationError

from schemas.envelope import EVENT_ID_NAMESPACE, Envelope, Source
from schemas.events import TERMINAL_EVENTS, OrderCommandRejected

# Not `order:`-prefixed, so it can never collide with an order's state key.
HELD_INDEX_KEY = "audit:held-orders"

AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
"""A datetime that must carry its zone when read back from the changelog."""


# The audit's state is built and rewritten for every event of every order, from envelopes the contract's
# pydantic models already validated, so it is a msgspec Struct: 3 to 20 times cheaper to build, copy,
# encode and decode than a model, and still checked field by field when read back from the changelog.
class HeldEvent(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """An event waiting to be written; `raw` is the record value as it arrived.

    It waits for two events: its cause, and `after`, the order's previous event on the same topic.
    The second keeps one service's events in the order it published them, even when the audit
    reads another topic behind (a refund must not overtake the charge it refunds).
    `traceparent` is the W3C trace context of the record it arrived in: written by a timer, it still
    joins the order's trace.
    """

    event_id: str
    causation_id: str | None
    after: str | None = None
    type: str
    occurred_at: AwareDatetime
    held_since: AwareDatetime
    raw: str
    traceparent: str | None = None

    @property
    def order(self) -> tuple[datetime, str, str]:
        """Siblings released together are written in this order, whatever order they arrived in."""
        return (self.occurred_at, self.type, self.event_id)

    @property
    def terminal(self) -> bool:
        return self.type in _TERMINAL_TYPES

    def waits_for(self) -> tuple[str, ...]:
        return tuple(event_id for event_id in (self.causation_id, self.after) if event_id is not None)


_TERMINAL_TYPES = frozenset(event.__name__ for event in TERMINAL_EVENTS)


class AuditOrderState(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """What the audit keeps for one order (key `order:<order_id>`).

    `written` lists the ids already on the audit topic, in the order they were written: that is
    what deduplicates a re-sent event, and also what a held event's cause is looked up in.
    `held` is empty once the order is quiet; after its terminal event (`closed`) only the ids
    remain, so a finished order costs a few dozen bytes per event, never the events themselves.
    `placed_at` is when the order's OrderPlaced occurred, once written and until the order closes:
    where its saga's duration starts.
    """

    order_id: str
    written: list[str] = msgspec.field(default_factory=list)
    held: dict[str, HeldEvent] = msgspec.field(default_factory=dict)
    closed: bool = False
    last_by_topic: dict[str, str] = msgspec.field(default_factory=dict)
    placed_at: AwareDatetime | None = None

    def seen(self, event_id: str) -> bool:
        return event_id in self.held or event_id in self.written

    def ready(self, event: HeldEvent) -> bool:
        return all(event_id in self.written for event_id in event.waits_for())

    def oldest_hold(self) -> datetime | None:
        return min((event.held_since for event in self.held.values()), default=None)


class HeldIndex(msgspec.Struct, frozen=True, kw_only=True):
    """Orders of one task that hold events, with their oldest hold, so a tick never scans every order."""

    orders: dict[str, AwareDatetime] = msgspec.field(default_factory=dict)

    def updated(self, state: AuditOrderState) -> HeldIndex:
        oldest = state.oldest_hold()
        orders = {key: value for key, value in self.orders.items() if key != state.order_id}
        if oldest is not None:
            orders[state.order_id] = oldest
        return HeldIndex(orders=orders)


@dataclass(frozen=True)
class Outcome:
    """The new state and the events to write to the audit topic, in this order."""

    state: AuditOrderState
    written: tuple[HeldEvent, ...] = ()
    forced: tuple[HeldEvent, ...] = ()
    duplicate: bool = False


def arrival(
    envelope: Envelope, raw: bytes | None, now: datetime, after: str | None = None, traceparent: str | None = None
) -> HeldEvent:
    """The event as the audit keeps it: the original bytes when they are UTF-8 JSON, else re-serialized."""
    text: str | None = None
    if raw is not None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
    if text is None:
        text = envelope.model_dump_json()
    return HeldEvent(
        event_id=str(envelope.event_id),
        causation_id=str(envelope.causation_id) if envelope.causation_id is not None else None,
        after=after,
        type=envelope.type,
        occurred_at=envelope.occurred_at,
        held_since=now,
        raw=text,
        traceparent=traceparent,
    )


def rejection_of(
    topic: str, partition: int, offset: int, *, key: bytes | None, value: bytes | None, reason: str
) -> Envelope | None:
    """The `OrderCommandRejected` for an invalid client record, or None when its key is no order id.

    The key, not the body, names the order: it is what placed the record on its partition, so the
    rejection joins that order's timeline in the task that owns it. Its id follows from where the
    record was read, so reading the record again yields the same event.
    """
    if key is None:
        return None
    rejected = OrderCommandRejected(
        topic=topic,
        command_type=_type_named(value),
        reason=reason if len(reason) <= REASON_LIMIT else reason[: REASON_LIMIT - 1] + "\N{HORIZONTAL ELLIPSIS}",
        partition=partition,
        offset=offset,
    )
    event_id = uuid.uuid5(EVENT_ID_NAMESPACE, f"{topic}/{partition}/{offset}/{Source.AUDIT.value}/rejected")
    try:
        return Envelope.new(rejected, order_id=key.decode(), source=Source.AUDIT, event_id=event_id)
    except (UnicodeDecodeError, ValidationError):
        return None


REASON_LIMIT = 500


def _type_named(value: bytes | None) -> str | None:
    """The `type` a record's JSON names, if it is JSON and names one."""
    try:
        document = json.loads(value) if value is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    named = document.get("type") if isinstance(document, dict) else None
    return named[:64] if isinstance(named, str) and named else None


def write_with_consequences(state: AuditOrderState, ready: Iterable[HeldEvent]) -> Outcome:
    """Write `ready`, then every held event that waited only for written ones, recursively.

    A heap keyed by (occurred_at, type, id) makes the output the same whatever order the events
    arrived in, and an event enters it only once what it waits for was written, so causality holds.
    """
    held = dict(state.held)
    written = list(state.written)
    closed = state.closed
    tiebreak = itertools.count()  # the same event may be queued twice; never compare models
    heap = [(event.order, next(tiebreak), event) for event in ready]
    heapq.heapify(heap)
    out: list[HeldEvent] = []
    while heap:
        _, _, event = heapq.heappop(heap)
        if event.event_id in written:
            continue
        held.pop(event.event_id, None)
        written.append(event.event_id)
        closed = closed or event.terminal
        out.append(event)
        for child in [held_event for held_event in held.values() if event.event_id in held_event.waits_for()]:
            if all(event_id in written for event_id in child.waits_for()):
                heapq.heappush(heap, (child.order, next(tiebreak), child))
    new_state = msgspec.structs.replace(state, held=held, written=written, closed=closed)
    return Outcome(state=compacted(new_state), written=tuple(out))


def compacted(state: AuditOrderState) -> AuditOrderState:
    """A closed order with nothing held keeps only its ids: enough to recognise a late duplicate."""
    if state.closed and not state.held:
        return AuditOrderState(
            order_id=state.order_id, written=state.written, closed=True, last_by_topic=state.last_by_topic
        )
    return state


def chain_root(state: AuditOrderState, event: HeldEvent) -> HeldEvent:
    """The earliest held ancestor of `event`: one that waits only for what never arrived (or, on a cycle,
    where it loops)."""
    visited = {event.event_id}
    current = event
    while True:
        parents = [state.held[event_id] for event_id in current.waits_for() if event_id in state.held]
        if not parents or parents[0].event_id in visited:
            return current
        visited.add(parents[0].event_id)
        current = parents[0]

"""Turning records into contract events once: decoding, dead-lettering, deduplication, re-emission.

A service's domain code is a set of pure handlers `(state, envelope) -> Reaction`; this module
runs them so that a redelivered event (same `event_id`) has no second effect and re-emits
exactly the events recorded the first time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Generic, Self, TypeVar

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.envelope import CE_TYPE, ContractError, Envelope, Source, describe_validation_error
from schemas.events import EVENT_TYPES, Event
from schemas.topics import Topic
from services.common.kafka import partition_for
from services.common.metrics import FORWARDED, SKIPPED
from services.common.processor import Incoming, TaskContext


class OrderState(BaseModel):
    """Base of a service's per-order state; `handled` maps each handled event id to what it emitted.

    Each service says when its part of an order is over (`finished`) and what it must still know
    then (`marker`), and which states have work of their own still to do (`pending`). A state
    without pending work is forgotten once the retention horizon has passed since its last change.
    """

    model_config = ConfigDict(frozen=True)

    order_id: str
    handled: dict[str, list[str]] = Field(default_factory=dict)

    def finished(self) -> bool:
        """Nothing this service does for the order is left: only late input can still arrive."""
        return False

    def pending(self) -> bool:
        """This service still has work of its own for the order (stock or money held, a timer, a retry)."""
        return False

    def marker(self) -> Self:
        """What a finished order keeps until the horizon: enough to answer duplicates and late input.

        `handled` stays whole, so a duplicate still re-emits exactly what it emitted the first time;
        services drop the rest of what only live work needed.
        """
        return self


State = TypeVar("State", bound=OrderState)
Body = TypeVar("Body", bound=BaseModel)
E = TypeVar("E", bound=Event)


@dataclass(frozen=True)
class Request:
    """An internal message to another stage of the same service (not part of the public contract)."""

    topic: Topic
    key: str
    body: BaseModel


@dataclass(frozen=True)
class Reaction(Generic[State]):
    state: State
    events: tuple[Event, ...] = ()
    requests: tuple[Request, ...] = field(default=())


Handler = Callable[[State, Envelope], Reaction[State]]


def _misrouted(task: TaskContext, message: Incoming, key: bytes) -> bool:
    """Dead-letter a record that sits on another partition than its key's: acting on it here would
    split that key's state between two tasks."""
    expected = partition_for(key, task.settings.partitions)
    if expected == message.partition:
        return False
    task.dead_letter(message, _misplaced(key, expected, message.partition))
    return True


def _misplaced(key: bytes, expected: int, found: int) -> str:
    return (
        f"partition: key {key.decode(errors='replace')!r} belongs on partition {expected} (murmur2), "
        f"not {found}; publish with Kafka's default partitioner (kcat: -X partitioner=murmur2_random)"
    )


def decode(
    task: TaskContext,
    message: Incoming,
    handles: Collection[type[Event]] | None = None,
    *,
    rejected: Callable[[str], None] | None = None,
) -> Envelope | None:
    """The message's envelope, or None after dead-lettering it with the reason.

    With `handles`, an event whose `ce_type` header names a type not among them is skipped unparsed
    (None, nothing dead-lettered): the service would ignore it anyway. Only a client topic's router
    parses and validates whole whatever a client wrote; a client's record on another partition than
    its key's is sent on to the right one (see `Topic.routed_by`), and `rejected` hears the reason
    when a client's record is invalid.
    """
    topic = message.topic
    if topic.written_by_clients and _elsewhere(task, message):
        return None
    # A client's record is parsed whole by its router, which dead-letters one whose `ce_type` names another
    # type than its body (`_checked`): the topic's other readers may then skip by the header as well.
    skippable = not topic.written_by_clients or topic.routed_by != task.service
    if skippable and handles is not None and ignored(message, handles):
        task.mark(SKIPPED)
        return None
    checked = _checked(task, message)
    if isinstance(checked, Envelope):
        return checked
    if topic.routed_by in (None, task.service):
        task.dead_letter(message, checked)
    if rejected is not None and topic.written_by_clients:
        rejected(checked)
    return None


def _elsewhere(task: TaskContext, message: Incoming) -> bool:
    """Whether a client's record sits on another partition than its key's, as clients whose default
    partitioner is not Kafka's murmur2 (librdkafka's, kcat's) put it. The topic's router sends it on,
    in the same transaction as this offset; it is then read and deduplicated (by `event_id`) as ever."""
    if message.key is None or message.in_process:
        return False
    expected = partition_for(message.key, task.settings.partitions)
    if expected == message.partition:
        return False
    if message.topic.routed_by == task.service:
        task.forward(message, expected)
        task.mark(FORWARDED)
    else:
        task.mark(SKIPPED)
    return True


def _checked(task: TaskContext, message: Incoming) -> Envelope | str:
    """The envelope when the record satisfies the contract and its topic, else why not."""
    try:
        envelope = Envelope.from_bytes(message.value)
    except ContractError as error:
        return error.reason
    if type(envelope.data) not in message.topic.events:
        return f"type: {envelope.type} is not carried on topic {message.topic.name}"
    if message.key != envelope.key:
        return f"key: the record key must equal order_id {envelope.order_id!r}"
    if message.topic.written_by_clients:
        # Its key's partition was checked before it was parsed (`_elsewhere`).
        return _mislabelled(message, envelope) or envelope
    expected = partition_for(envelope.key, task.settings.partitions)
    if expected != message.partition:
        return _misplaced(envelope.key, expected, message.partition)
    return envelope


def _mislabelled(message: Incoming, envelope: Envelope) -> str | None:
    """Why a client's record is invalid when its `ce_type` header names another type than its body: the
    topic's other readers skip by that header, so acting on the body would split the saga."""
    named = message.header(CE_TYPE)
    if named is None or named == envelope.type.encode():
        return None
    return (
        f"header: ce_type {named.decode(errors='replace')!r} does not name the event's type {envelope.type!r}; "
        "send the event's type or no ce_type header"
    )


def ignored(message: Incoming, handles: Collection[type[Event]]) -> bool:
    """Whether the record's `ce_type` header names a known event type outside `handles`."""
    named = message.header(CE_TYPE)
    event_type = EVENT_TYPES.get(named.decode(errors="replace")) if named is not None else None
    return event_type is not None and event_type not in handles


class AppliedOffset(msgspec.Struct, frozen=True):
    """Stored for every request an entity stage reads, so as cheap to build and encode as can be."""

    offset: int


def read_again(task: TaskContext, message: Incoming) -> bool:
    """Whether this task applied `message` before: it is being read again from a rewound offset.

    An entity stage (stock by SKU, credit by customer) forgets an order once it is settled, so a
    request read again after an operator rewinds the consumer group would apply a second time. The
    highest offset applied, kept in the task's state and committed with it, tells a replay from a
    new request, in constant space.
    """
    if message.in_process:
        return False  # never written to a topic, so never read again
    key = f"applied:{message.topic.name}"
    applied = task.store.get(key, AppliedOffset)
    if applied is not None and message.offset <= applied.offset:
        return True
    task.store.put(key, AppliedOffset(offset=message.offset))
    return False


def decode_internal(
    task: TaskContext, message: Incoming, model: type[Body], key_field: str, key_of: Callable[[Body], str]
) -> Body | None:
    """An internal message between two stages of a service, or None after dead-lettering it."""
    if message.value is None:
        task.dead_letter(message, "value: empty message (null value)")
        return None
    try:
        body = model.model_validate_json(message.value)
    except ValidationError as error:
        task.dead_letter(message, f"invalid {model.__name__}: {describe_validation_error(error)}")
        return None
    key = key_of(body).encode()
    if message.key != key:
        task.dead_letter(message, f"key: the record key must equal {key_field} {key_of(body)!r}")
        return None
    if _misrouted(task, message, key):
        return None
    return body


def payload(envelope: Envelope, event_type: type[E]) -> E:
    """The envelope's data as `event_type`; handlers are looked up by type, so a mismatch is a bug."""
    if not isinstance(envelope.data, event_type):
        raise TypeError(f"expected {event_type.__name__}, got {envelope.type}")
    return envelope.data


def order_key(order_id: str) -> str:
    return f"order:{order_id}"


def save_order(task: TaskContext, state: OrderState) -> None:
    """Store an order's state: a finished one as its marker, and, unless work is pending, with an
    expiry one retention horizon after the latest record the task has seen."""
    if state.finished():
        state = state.marker()
    expires_at = None if state.pending() else task.stream_time_ms + task.retention_ms
    task.store.put(order_key(state.order_id), state, expires_at=expires_at)


def forgotten(task: TaskContext, message: Incoming, envelope: Envelope) -> bool:
    """Dead-letter an event for an order this task does not know that happened before the horizon:
    the order ended and was forgotten, and acting on the event would start it again."""
    horizon_ms = task.stream_time_ms - task.retention_ms
    if envelope.occurred_at.timestamp() * 1000 >= horizon_ms:
        return False
    task.dead_letter(
        message,
        f"expired: {envelope.type} for order {envelope.order_id!r} occurred at {envelope.occurred_at.isoformat()}, "
        f"before the retention horizon ({task.settings.order_retention}), and the order is no longer remembered; "
        "an order id is unique only within that horizon",
    )
    return True


def apply_once(
    task: TaskContext,
    message: Incoming,
    envelope: Envelope,
    *,
    source: Source,
    model: type[State],
    handlers: Mapping[type[Event], Handler[State]],
    starts: frozenset[type[Event]] | None = None,
) -> None:
    """Run the handler for `envelope` against its order's state, unless it was handled before.

    An event for an order the task does not know is dead-lettered when it predates the horizon, or
    when it is not one of `starts`, the events that may begin an order here (default: any).
    """
    handler = handlers.get(type(envelope.data))
    if handler is None:
        return
    known = task.store.get(order_key(envelope.order_id), model)
    if known is None and (forgotten(task, message, envelope) or unknown(task, message, envelope, starts)):
        return
    state = known or model(order_id=envelope.order_id)
    recorded = state.handled.get(str(envelope.event_id))
    if recorded is not None:
        for raw in recorded:
            task.emit(Envelope.model_validate_json(raw), raw)
        return
    reaction = handler(state, envelope)
    emitted = [envelope.caused(event, source) for event in reaction.events]
    encoded = [e.model_dump_json() for e in emitted]
    handled = {**reaction.state.handled, str(envelope.event_id): encoded}
    save_order(task, reaction.state.model_copy(update={"handled": handled}))
    _publish(task, emitted, encoded, reaction.requests)


def unknown(task: TaskContext, message: Incoming, envelope: Envelope, starts: frozenset[type[Event]] | None) -> bool:
    if starts is None or type(envelope.data) in starts:
        return False
    task.dead_letter(
        message,
        f"unknown order: {envelope.type} for order {envelope.order_id!r}, which was never placed or ended more "
        f"than the retention horizon ({task.settings.order_retention}) ago",
    )
    return True


def apply_settled(
    task: TaskContext,
    before: State,
    reaction: Reaction[State],
    *,
    source: Source,
    cause_id: str | None,
) -> list[Envelope]:
    """Apply a reaction to an internal reply on behalf of the saga event `cause_id` that started the exchange.

    That event was recorded as handled with no output when it arrived; its events are added there now, so
    a later redelivery of it re-emits exactly these envelopes.
    """
    state = reaction.state
    emitted: list[Envelope] = []
    encoded: list[str] = []
    if cause_id is not None and reaction.events:
        cause = uuid.UUID(cause_id)
        emitted = [Envelope.new(e, order_id=state.order_id, source=source, cause=cause) for e in reaction.events]
        encoded = [e.model_dump_json() for e in emitted]
        recorded = [*state.handled.get(cause_id, []), *encoded]
        state = state.model_copy(update={"handled": {**state.handled, cause_id: recorded}})
    if state != before:
        save_order(task, state)
    _publish(task, emitted, encoded, reaction.requests)
    return emitted


def _publish(task: TaskContext, emitted: list[Envelope], encoded: list[str], requests: tuple[Request, ...]) -> None:
    """Emit each envelope as the JSON it was recorded as, then send the requests."""
    for envelope, raw in zip(emitted, encoded, strict=True):
        task.emit(envelope, raw)
    for request in requests:
        task.send(request.topic, request.key, request.body.model_dump_json().encode())

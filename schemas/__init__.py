"""The public contract of Choreo: the event envelope, the event types and the topic registry."""

from schemas.deadletter import DeadLetter
from schemas.envelope import ContractError, Envelope, Source
from schemas.events import EVENT_TYPES, TERMINAL_EVENTS, Event

__all__ = ["EVENT_TYPES", "TERMINAL_EVENTS", "ContractError", "DeadLetter", "Envelope", "Event", "Source"]

"""The event contract: validation, serialization, generated files and the topic registry."""

from __future__ import annotations

import json
import types
import typing
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import AwareDatetime, BaseModel

from schemas.envelope import ContractError, Envelope, Source
from schemas.events import EVENT_TYPES, OrderLine, OrderPlaced, PaymentVoided
from schemas.topics import ALL_TOPICS, AUDIT, AUDIT_EVENTS, EVENT_TOPICS, MONITOR_STATE, SAGA_TOPICS, topic_of
from services.common.contract_export import stale_files

EXAMPLES = Path(__file__).resolve().parents[1] / "schemas" / "examples"


def _example(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((EXAMPLES / f"{name}.json").read_text())
    return document


def _with_data(**changes: Any) -> bytes:
    document = _example("OrderPlaced")
    document["data"] = {**document["data"], **changes}
    return json.dumps(document).encode()


def test_hand_written_examples_are_valid() -> None:
    for path in sorted(EXAMPLES.glob("*.json")):
        envelope = Envelope.from_bytes(path.read_bytes())
        assert envelope.type == path.stem


def test_order_placed_round_trips_unchanged() -> None:
    envelope = Envelope.from_bytes((EXAMPLES / "OrderPlaced.json").read_bytes())
    again = Envelope.from_bytes(envelope.to_bytes())
    assert again == envelope
    assert isinstance(again.data, OrderPlaced)
    assert str(again.data.total) == "288.98"
    assert json.loads(again.to_bytes())["data"]["items"][0]["unit_price"] == "19.99"


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (_with_data(items=[]), "data.items"),
        (_with_data(items=[{"sku": "A", "quantity": 0, "unit_price": "1.00"}]), "data.items.0.quantity"),
        (_with_data(items=[{"sku": "A", "quantity": 1, "unit_price": 1.5}]), "data.items.0.unit_price"),
        (_with_data(ship_to={"country": "XX"}), "data.ship_to.country"),
        (_with_data(currency="EURO"), "data.currency"),
        (_with_data(customer_id=None), "data.customer_id"),
    ],
)
def test_invalid_messages_name_the_problem(raw: bytes, names: str) -> None:
    with pytest.raises(ContractError) as raised:
        Envelope.from_bytes(raw)
    assert names in raised.value.reason


def test_missing_envelope_field_and_unknown_type_are_named() -> None:
    document = _example("OrderPlaced")
    del document["order_id"]
    with pytest.raises(ContractError, match="order_id"):
        Envelope.from_bytes(json.dumps(document).encode())
    with pytest.raises(ContractError, match="unknown event type 'OrderShipped'"):
        Envelope.from_bytes(json.dumps({**_example("OrderPlaced"), "type": "OrderShipped"}).encode())


def test_a_newer_schema_version_is_refused() -> None:
    with pytest.raises(ContractError, match="schema_version"):
        Envelope.from_bytes(json.dumps({**_example("OrderPlaced"), "schema_version": 2}).encode())


def test_timestamps_need_an_offset() -> None:
    with pytest.raises(ContractError, match="occurred_at"):
        Envelope.from_bytes(json.dumps({**_example("OrderPlaced"), "occurred_at": "2026-11-25T10:15:00"}).encode())


def test_events_caused_by_the_same_event_get_the_same_id() -> None:
    cause = Envelope.from_bytes((EXAMPLES / "OrderCancellationRequested.json").read_bytes())
    first = cause.caused(PaymentVoided(reason="cancelled"), Source.PAYMENT)
    second = cause.caused(PaymentVoided(reason="cancelled"), Source.PAYMENT)
    assert first.event_id == second.event_id
    assert first.causation_id == cause.event_id
    assert first.order_id == cause.order_id
    assert Envelope.new(PaymentVoided(reason="x"), order_id="o", source=Source.CLIENT).event_id != uuid.UUID(int=0)


def test_money_is_exact() -> None:
    line = OrderLine.model_validate({"sku": "A", "quantity": 3, "unit_price": "0.10"})
    assert str(line.subtotal) == "0.30"


def test_generated_contract_files_are_current() -> None:
    assert stale_files() == [], "run `choreo schemas export` and commit the result"


def test_every_event_type_is_carried_by_exactly_one_topic() -> None:
    for event_type in EVENT_TYPES.values():
        carriers = [topic for topic in EVENT_TOPICS if event_type in topic.events]
        if event_type in AUDIT_EVENTS:
            assert carriers == [], event_type.__name__
            assert topic_of(event_type) is AUDIT
            continue
        assert len(carriers) == 1, event_type.__name__
        assert topic_of(event_type) is carriers[0]
    assert set(AUDIT.events) == {event for topic in SAGA_TOPICS for event in topic.events} | set(AUDIT_EVENTS)


def test_registry_names_are_unique_and_monitor_state_is_compacted() -> None:
    names = [topic.name for topic in ALL_TOPICS]
    assert len(names) == len(set(names))
    assert MONITOR_STATE.compacted
    assert all(not topic.compacted for topic in SAGA_TOPICS)


# --- the one-pass decoding agrees with the reference validation -------------------------------------

_SAMPLE_STRINGS = {"currency": "EUR", "country": "DE", "ship_to": "DE", "service": "inventory", "topic": "orders"}


_SCALARS: dict[Any, Any] = {
    bool: True,
    int: 3,
    float: 1.5,
    Decimal: "12.50",
    datetime: "2026-03-01T10:00:00.250+02:00",
    AwareDatetime: "2026-03-01T10:00:00.250+02:00",
}


def _sample(annotation: Any, name: str) -> Any:
    """A valid JSON value for a field of the contract, by its type (and, for strings, its name)."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is typing.Annotated:
        value = _sample(arguments[0], name)
    elif origin in (typing.Union, types.UnionType):
        value = _sample(next(arg for arg in arguments if arg is not type(None)), name)
    elif origin is list:
        value = [_sample(arguments[0], name)]
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        value = {field: _sample(info.annotation, field) for field, info in annotation.model_fields.items()}
    else:
        value = _SCALARS.get(annotation, _SAMPLE_STRINGS.get(name, "WIDGET-1"))
    return value


def _samples() -> list[bytes]:
    """One envelope of every event type, then variations the reference validation treats one way or another."""
    envelopes: list[dict[str, Any]] = []
    for name, event_type in EVENT_TYPES.items():
        data = _sample(event_type, "data")
        event_type.model_validate(data)  # the sample itself is valid
        envelope = {**_example("OrderPlaced"), "type": name, "data": data, "causation_id": str(uuid.uuid4())}
        envelopes.append(envelope)
    variations: list[dict[str, Any]] = [
        {"causation_id": None},
        {"occurred_at": "2026-03-01T10:00:00Z"},
        {"occurred_at": "2026-03-01T10:00:00"},  # no offset
        {"schema_version": 2},
        {"schema_version": 0},
        {"schema_version": "1"},
        {"type": "OrderShipped"},
        {"type": None},
        {"data": None},
        {"data": []},
        {"extra": 1},
        {"source": "somewhere"},
        {"event_id": "not-a-uuid"},
        {"order_id": "bad id"},
    ]
    base = envelopes[0]
    document_variations = [{**base, **change} for change in variations]
    document_variations += [
        {**base, "data": {**base["data"], "extra": 1}},
        {k: v for k, v in base.items() if k != "data"},
    ]
    return [json.dumps(document).encode() for document in envelopes + document_variations] + [b"{", b"[]", b"\xff"]


@pytest.mark.parametrize("raw", _samples())
def test_one_pass_decoding_agrees_with_the_reference_validation(raw: bytes) -> None:
    try:
        expected: Envelope | str = Envelope.from_document(raw)
    except ContractError as error:
        expected = error.reason
    try:
        found: Envelope | str = Envelope.from_bytes(raw)
    except ContractError as error:
        found = error.reason
    assert found == expected
    if isinstance(found, Envelope):
        assert isinstance(expected, Envelope)
        assert type(found.data) is type(expected.data)
        assert found.to_bytes() == expected.to_bytes()
        assert found.model_fields_set == expected.model_fields_set


def test_every_event_type_has_a_valid_sample() -> None:
    valid = [raw for raw in _samples() if not isinstance(_decoded_or_reason(raw), str)]
    assert {Envelope.from_bytes(raw).type for raw in valid} == set(EVENT_TYPES)


def _decoded_or_reason(raw: bytes) -> Envelope | str:
    try:
        return Envelope.from_bytes(raw)
    except ContractError as error:
        return error.reason

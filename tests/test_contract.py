"""The event contract: validation, serialization, generated files and the topic registry."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

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

"""CloudEvents headers: every event a service emits carries them, and a service skips by `ce_type`,
unparsed, the events it has no handler for, unless a client wrote them."""

from __future__ import annotations

import pytest

from schemas.deadletter import DeadLetter
from schemas.envelope import CE_ID, CE_SOURCE, CE_SPECVERSION, CE_SUBJECT, CE_TIME, CE_TYPE, Envelope
from schemas.topics import APPROVAL_EVENTS, ORDERS, Topic
from services.common.processor import Incoming
from services.inventory.app import build_app as build_inventory
from services.inventory.settings import InventorySettings
from tests.app_harness import AppHarness
from tests.audit.builders import Harness as AuditHarness
from tests.shipping.test_shipping import Harness as ShippingHarness
from tests.shipping.test_shipping import cancel, granted

NOT_JSON = b"{not json"


def typed(name: str) -> tuple[tuple[str, bytes], ...]:
    return ((CE_SPECVERSION, b"1.0"), (CE_TYPE, name.encode()))


def test_every_emitted_event_carries_its_cloudevents_attributes() -> None:
    # Given shipping, when an approved order arrives
    outs = ShippingHarness().feed(APPROVAL_EVENTS, granted("o-1"))
    # Then each event it emits names its own id, type, source, subject and time in headers
    assert outs
    for out in outs:
        assert out.envelope is not None
        envelope: Envelope = out.envelope
        assert dict(out.headers) == {
            CE_SPECVERSION: b"1.0",
            CE_ID: str(envelope.event_id).encode(),
            CE_TYPE: envelope.type.encode(),
            CE_SOURCE: envelope.source.value.encode(),
            CE_SUBJECT: envelope.order_id.encode(),
            CE_TIME: envelope.model_dump(mode="json")["occurred_at"].encode(),
        }


def test_an_event_the_service_does_not_handle_is_skipped_unparsed() -> None:
    shipping = ShippingHarness()
    # ApprovalRequested has no handler in shipping: even a body that is not JSON is never read.
    headers = typed("ApprovalRequested")
    assert shipping.feed_raw(APPROVAL_EVENTS, b"o-1", NOT_JSON, shipping.partition("o-1"), headers) == []


@pytest.mark.parametrize(
    ("topic", "headers", "why"),
    [
        (APPROVAL_EVENTS, typed("ApprovalGranted"), "a type the service handles is parsed"),
        (APPROVAL_EVENTS, (), "without a ce_type header the record is parsed"),
        (APPROVAL_EVENTS, typed("NoSuchEvent"), "an unknown type in the header is parsed"),
    ],
)
def test_anything_else_is_parsed_and_a_bad_body_dead_lettered(
    topic: Topic, headers: tuple[tuple[str, bytes], ...], why: str
) -> None:
    shipping = ShippingHarness()
    outs = shipping.feed_raw(topic, b"o-1", NOT_JSON, shipping.partition("o-1"), headers)
    letters = [out.dead_letter for out in outs if out.dead_letter is not None]
    assert len(letters) == 1, why
    assert isinstance(letters[0], DeadLetter)
    assert letters[0].reason.startswith("not JSON")


def test_what_a_client_wrote_is_parsed_whole_by_its_router_whatever_its_headers() -> None:
    inventory = AppHarness(InventorySettings(_env_file=None), build_inventory)
    # ApprovalRequested has no handler in inventory, yet the router of `orders` parses the record all the same.
    outs = inventory.feed_raw(ORDERS, b"o-1", NOT_JSON, inventory.partition("o-1"), typed("ApprovalRequested"))
    [letter] = [out.dead_letter for out in outs if out.dead_letter is not None]
    assert letter.reason.startswith("not JSON")


def test_another_reader_of_a_client_topic_skips_by_the_header_what_it_does_not_handle() -> None:
    shipping = ShippingHarness()
    # Shipping reads `orders` for cancellations only: an OrderPlaced is never parsed, and never dead-lettered
    # by anyone but the router.
    assert shipping.feed_raw(ORDERS, b"o-1", NOT_JSON, shipping.partition("o-1"), typed("OrderPlaced")) == []


def test_a_client_record_whose_header_lies_is_dead_lettered_by_its_router_and_acted_on_by_none() -> None:
    # Given a cancellation whose ce_type header says OrderPlaced
    request = cancel("o-1")
    lying = (*[(name, value) for name, value in request.headers() if name != CE_TYPE], (CE_TYPE, b"OrderPlaced"))
    inventory = AppHarness(InventorySettings(_env_file=None), build_inventory)
    shipping = ShippingHarness()
    audit = AuditHarness.for_order("o-1")
    # When each reader of `orders` reads it
    routed = inventory.feed_raw(ORDERS, b"o-1", request.to_bytes(), inventory.partition("o-1"), lying)
    skipped = shipping.feed_raw(ORDERS, b"o-1", request.to_bytes(), shipping.partition("o-1"), lying)
    audited = audit.feed(Incoming(ORDERS, audit.partition, 0, b"o-1", request.to_bytes(), 0, lying))
    # Then the router dead-letters it with the reason, shipping skips it by its header, and the audit
    # puts the rejection on the order's timeline: no reader acts on it as a cancellation
    [letter] = [out.dead_letter for out in routed if out.dead_letter is not None]
    assert letter.reason.startswith("header: ce_type 'OrderPlaced' does not name the event's type")
    assert [out for out in routed if out.envelope is not None] == []
    assert skipped == []
    assert [envelope.type for envelope in audited] == ["OrderCommandRejected"]


def test_a_client_record_whose_header_names_its_own_type_is_handled() -> None:
    shipping = ShippingHarness()
    request = cancel("o-1")
    outs = shipping.feed_raw(ORDERS, b"o-1", request.to_bytes(), shipping.partition("o-1"), request.headers())
    assert [out.envelope.type for out in outs if out.envelope is not None] == ["ShipmentCancelled"]


def test_audit_handles_every_type_so_it_dead_letters_what_others_skipped() -> None:
    audit = AuditHarness.for_order("o-1")
    skipped = Incoming(APPROVAL_EVENTS, audit.partition, 3, b"o-1", NOT_JSON, 0, typed("ApprovalRequested"))
    assert audit.feed(skipped) == []
    [letter] = [DeadLetter.model_validate_json(raw) for raw in audit.dead_letters]
    assert (letter.consumer, letter.offset) == ("audit", 3)

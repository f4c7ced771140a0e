"""The audit StreamApp, driven through a real TaskContext and an in-memory store (no broker)."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from decimal import Decimal

import msgspec
import pytest

from schemas.deadletter import DeadLetter
from schemas.envelope import Envelope, Source
from schemas.events import OrderCancellationRequested, OrderCommandRejected, PaymentRefunded, ShipmentCancelled
from schemas.topics import AUDIT, AUDIT_STATE, SAGA_TOPICS, SHIPPING_EVENTS
from services.audit.app import AuditApp, build_app
from services.audit.settings import AuditSettings
from services.common.kafka import partition_for
from services.common.processor import Incoming
from tests.audit.builders import (
    SETTINGS,
    WAIT,
    Harness,
    completed_saga,
    customer_cancelled_saga,
    interleave,
    record,
    refund_retried_saga,
    refused_cancellation,
    shipping_failed_saga,
    topic_name,
)


def ids(envelopes: list[Envelope]) -> list[str]:
    return [str(envelope.event_id) for envelope in envelopes]


def types(envelopes: list[Envelope]) -> list[str]:
    return [envelope.type for envelope in envelopes]


# --- wiring ---------------------------------------------------------------------------------------


def test_the_app_reads_every_saga_topic_and_keeps_its_state_in_its_changelog() -> None:
    app = build_app(AuditSettings(_env_file=None))
    assert app.name == "audit"
    assert tuple(app.inputs) == SAGA_TOPICS
    assert app.changelog == AUDIT_STATE
    assert app.causal_wait == timedelta(seconds=10)


def test_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert AuditSettings(_env_file=None).health_port == 8105
    monkeypatch.setenv("CHOREO_AUDIT_CAUSAL_WAIT", "2.5")
    settings = AuditSettings(_env_file=None)
    assert settings.audit_causal_wait == timedelta(seconds=2.5)
    assert build_app(settings).causal_wait == timedelta(seconds=2.5)


# --- in order, once -------------------------------------------------------------------------------


def test_events_arriving_in_causal_order_are_written_at_once_keyed_by_order() -> None:
    # Given a completed saga
    saga = completed_saga()
    audit = Harness.for_order("o-happy")
    # When its events arrive in the order they happened
    written = audit.feed(*saga)
    # Then each is written once, in that order, and nothing is held
    assert ids(written) == ids(saga)
    state = audit.state("o-happy")
    assert state is not None
    assert state.held == {}
    assert audit.held_index().orders == {}


def test_the_original_record_bytes_are_forwarded_unchanged() -> None:
    # Given an event published with its own spacing and field order
    [placed, *_] = completed_saga()
    document = json.loads(placed.to_bytes())
    original = json.dumps(dict(reversed(list(document.items()))), indent=2).encode()
    audit = Harness.for_order(placed.order_id)
    # When it is audited
    audit.feed(record(placed, value=original))
    # Then the audit record is byte for byte what was published
    assert audit.audit == [original]


def test_audit_records_are_keyed_by_order_id() -> None:
    saga = completed_saga()
    audit = Harness.for_order("o-happy")
    task_outbox = audit._context()
    assert audit.app is not None
    audit.app.process(task_outbox, record(saga[0]))
    [out] = task_outbox.outbox
    assert (out.topic, out.key, out.value) == (SETTINGS.topic(AUDIT), b"o-happy", saga[0].to_bytes())


# --- duplicates -----------------------------------------------------------------------------------


def test_a_duplicate_event_is_written_once() -> None:
    # Given an order whose placement and reservation were audited
    placed, reserved, *_ = completed_saga()
    audit = Harness.for_order(placed.order_id)
    audit.feed(placed, reserved)
    # When the same events are published again (a re-sent command, a re-emitted outcome)
    again = audit.feed(placed, reserved, reserved)
    # Then nothing more is written
    assert again == []
    assert audit.audited() == [placed, reserved]


def test_a_duplicate_of_a_held_event_is_not_held_twice_nor_written_twice() -> None:
    placed, reserved, charged, *_ = completed_saga()
    audit = Harness.for_order(placed.order_id)
    assert audit.feed(charged, charged) == []
    state = audit.state(placed.order_id)
    assert state is not None
    assert list(state.held) == [str(charged.event_id)]
    assert ids(audit.feed(placed, reserved, charged)) == ids([placed, reserved, charged])


# --- causal order ---------------------------------------------------------------------------------


def test_an_effect_arriving_before_its_cause_is_held_then_written_after_it() -> None:
    # Given the payment's charge arrives before the reservation that caused it
    placed, reserved, charged, *_ = completed_saga()
    audit = Harness.for_order(placed.order_id)
    assert ids(audit.feed(placed)) == ids([placed])
    # When the charge arrives first
    assert audit.feed(charged) == []
    # Then it is held, and the task's index knows the order waits
    state = audit.state(placed.order_id)
    assert state is not None
    assert set(state.held) == {str(charged.event_id)}
    assert set(audit.held_index().orders) == {placed.order_id}
    # When the reservation arrives
    written = audit.feed(reserved)
    # Then the reservation is written, then the charge it caused
    assert ids(written) == ids([reserved, charged])
    state = audit.state(placed.order_id)
    assert state is not None
    assert state.held == {}
    assert audit.held_index().orders == {}


def test_a_compensation_arriving_first_is_written_after_what_triggered_it() -> None:
    # Given a saga whose shipping failed and was compensated
    saga = shipping_failed_saga()
    placed, reserved, charged, granted, failed, refunded, released, cancelled = saga
    audit = Harness.for_order(placed.order_id)
    # When the later topics are read first: shipping, approval and payment ahead of inventory and orders
    assert audit.feed(failed, granted, charged, refunded) == []
    assert audit.feed(reserved, released, cancelled) == []
    written = audit.feed(placed)
    # Then every event is written once, each after its cause, siblings by time then type
    assert ids(written) == ids([placed, reserved, charged, granted, failed, refunded, released, cancelled])


def test_a_client_command_without_a_cause_is_written_at_once() -> None:
    placed, cancel, *_ = customer_cancelled_saga()
    audit = Harness.for_order(placed.order_id)
    assert ids(audit.feed(cancel)) == ids([cancel])
    assert ids(audit.feed(placed)) == ids([placed])


# --- a cause that never comes --------------------------------------------------------------------


def test_an_event_whose_cause_never_arrives_is_written_by_tick_after_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given the reservation was dead-lettered, so the charge it caused waits for it
    placed, _reserved, charged, *_ = completed_saga()
    audit = Harness.for_order(placed.order_id)
    audit.feed(placed, charged)
    # When less than the wait has passed
    # Then the charge is still held
    assert audit.tick(WAIT - timedelta(seconds=1)) == []
    # When the wait has passed
    with caplog.at_level(logging.WARNING, logger="services.audit.app"):
        flushed = audit.tick(timedelta(seconds=1))
    # Then the charge is written anyway, logged, and nothing is held any more
    assert ids(flushed) == ids([charged])
    warnings = [r for r in caplog.records if "cause never arrived" in r.getMessage()]
    assert [getattr(r, "type", None) for r in warnings] == ["PaymentCharged"]
    state = audit.state(placed.order_id)
    assert state is not None
    assert state.held == {}
    assert audit.held_index().orders == {}
    assert audit.tick(WAIT) == []


def test_a_late_cause_after_the_flush_is_written_and_its_effect_is_not_repeated() -> None:
    placed, reserved, charged, *_ = completed_saga()
    audit = Harness.for_order(placed.order_id)
    audit.feed(placed, charged)
    audit.tick(WAIT)
    assert ids(audit.feed(reserved)) == ids([reserved])
    assert ids(audit.audited()) == ids([placed, charged, reserved])


def test_a_held_chain_is_flushed_from_its_oldest_ancestor() -> None:
    # Given the reservation never arrives, and the approval arrived before the charge it followed
    placed, _reserved, charged, granted, *_ = completed_saga()
    audit = Harness.for_order(placed.order_id)
    audit.feed(placed, granted)
    audit.clock.advance(timedelta(seconds=6))
    audit.feed(charged)
    # When the approval has waited long enough (the charge not yet)
    flushed = audit.tick(timedelta(seconds=4))
    # Then the charge is written before the approval it caused
    assert ids(flushed) == ids([charged, granted])


def test_a_restarted_task_waits_again_before_flushing() -> None:
    # Given an event held before a restart, for longer than the wait
    placed, reserved, charged, *_ = completed_saga()
    audit = Harness.for_order(placed.order_id)
    audit.feed(placed, charged)
    audit.clock.advance(WAIT * 3)
    # When a new process takes the task over, its cause may still be in the backlog
    restarted = audit.restarted()
    # Then the first ticks do not flush it, and the backlog's cause releases it in order
    assert restarted.tick() == []
    assert restarted.tick(WAIT / 2) == []
    assert ids(restarted.feed(reserved)) == ids([reserved, charged])


def test_an_event_naming_itself_as_cause_is_still_written_after_the_wait() -> None:
    placed, *_ = completed_saga()
    looping = placed.model_copy(update={"causation_id": placed.event_id})
    audit = Harness.for_order(placed.order_id)
    assert audit.feed(looping) == []
    assert ids(audit.tick(WAIT)) == ids([placed])


# --- poison ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "not JSON"),
        (b'{"type": "OrderShipped"}', "unknown event type"),
        (None, "empty message"),
    ],
)
def test_poison_from_a_service_is_dead_lettered_and_the_partition_keeps_flowing(
    value: bytes | None, reason: str
) -> None:
    # Given a poison record on a service's topic among valid events
    placed, reserved, *_ = completed_saga()
    audit = Harness.for_order(placed.order_id)
    good = record(reserved)
    poison = Incoming(good.topic, good.partition, 7, good.key, value, 0)
    # When the batch is audited
    written = audit.feed(poison, reserved, placed)
    # Then the poison is dead-lettered with the reason, and the valid events are written in order
    [dead] = [DeadLetter.model_validate_json(raw) for raw in audit.dead_letters]
    assert reason in dead.reason
    assert (dead.consumer, dead.offset) == ("audit", 7)
    assert ids(written) == ids([placed, reserved])


def test_an_invalid_client_command_joins_its_orders_timeline_as_a_rejection() -> None:
    # Given a client's OrderPlaced with an invalid quantity, keyed by its order id, then a valid one
    placed, reserved, *_ = completed_saga()
    audit = Harness.for_order(placed.order_id)
    document = placed.model_dump(mode="json")
    document["data"]["items"][0]["quantity"] = 0
    good = record(placed)
    invalid = Incoming(good.topic, good.partition, 3, good.key, json.dumps(document).encode(), 0)
    # When both are audited
    written = audit.feed(invalid, record(placed, 4), record(reserved))
    # Then the rejection comes first on the order's timeline, with the reason and where it was read;
    # the dead letter is left to the topic's router (inventory), so there is one, not one per reader
    assert types(written) == ["OrderCommandRejected", "OrderPlaced", "InventoryReserved"]
    rejection = written[0]
    assert isinstance(rejection.data, OrderCommandRejected)
    assert (rejection.order_id, rejection.source, rejection.causation_id) == (placed.order_id, Source.AUDIT, None)
    assert rejection.data.model_dump() == {
        "topic": "orders",
        "command_type": "OrderPlaced",
        "reason": rejection.data.reason,
        "partition": good.partition,
        "offset": 3,
    }
    assert "data.items.0.quantity" in rejection.data.reason
    assert audit.dead_letters == []


def test_an_invalid_command_read_again_is_rejected_once() -> None:
    # Given an invalid command already audited
    placed, *_ = completed_saga()
    audit = Harness.for_order(placed.order_id)
    good = record(placed)
    invalid = Incoming(good.topic, good.partition, 9, good.key, b"{not json", 0)
    [rejection] = audit.feed(invalid)
    # When the same record is read again (a rewound group)
    again = audit.feed(invalid)
    # Then nothing is written a second time
    assert again == []
    assert isinstance(rejection.data, OrderCommandRejected)
    assert rejection.data.reason.startswith("not JSON")


@pytest.mark.parametrize("key", [None, b"not an order id!", b"\xff\xfe"])
def test_an_invalid_command_without_a_usable_order_id_has_no_rejection(key: bytes | None) -> None:
    # Given an invalid client record on its key's partition (any, for a null key)
    placed, *_ = completed_saga()
    audit = Harness(partition_for(key, SETTINGS.partitions)) if key is not None else Harness.for_order(placed.order_id)
    invalid = Incoming(record(placed).topic, audit.partition, 2, key, b"{not json", 0)
    # Then no order's timeline gets it
    assert audit.feed(invalid) == []


def test_an_event_on_the_wrong_topic_is_dead_lettered() -> None:
    placed, *_ = completed_saga()
    audit = Harness.for_order(placed.order_id)
    misplaced = Incoming(SHIPPING_EVENTS, audit.partition, 0, placed.key, placed.to_bytes(), 0)
    assert audit.feed(misplaced) == []
    [dead] = [DeadLetter.model_validate_json(raw) for raw in audit.dead_letters]
    assert "is not carried on topic" in dead.reason
    assert audit.state(placed.order_id) is None


# --- bounded state --------------------------------------------------------------------------------


def test_a_finished_order_keeps_only_the_ids_of_its_events() -> None:
    # Given a completed order
    saga = completed_saga()
    audit = Harness.for_order("o-happy")
    # When it is audited with its topics read in reverse
    audit.feed(*interleave(saga, [topic_name(event) for event in reversed(saga)]))
    # Then its state is closed and holds the ids of what was written, no event bodies
    state = audit.state("o-happy")
    assert state is not None
    assert state.closed
    assert state.held == {}
    assert sorted(state.written) == sorted(ids(saga))
    stored = msgspec.json.encode(state)  # as the store writes it
    assert set(json.loads(stored)) == {"order_id", "written", "closed", "last_by_topic"}
    assert state.placed_at is None
    assert b"OrderPlaced" not in stored
    # And the task no longer lists the order as waiting
    assert audit.held_index().orders == {}


def test_a_finished_order_still_dedupes_late_duplicates_and_audits_late_new_events() -> None:
    saga = completed_saga()
    audit = Harness.for_order("o-happy")
    audit.feed(*saga)
    # When the outcome is re-emitted after the order closed
    assert audit.feed(saga[-1], saga[0]) == []
    # And a refused cancellation arrives, effect first
    cancel, refused = refused_cancellation(saga)
    assert audit.feed(refused) == []
    assert ids(audit.feed(cancel)) == ids([cancel, refused])
    state = audit.state("o-happy")
    assert state is not None
    assert state.closed
    assert state.held == {}


def test_orders_sharing_a_task_are_kept_apart() -> None:
    audit = Harness.for_order("o-a")
    other = next(f"o-b{n}" for n in range(1000) if Harness.for_order(f"o-b{n}").partition == audit.partition)
    first, second = completed_saga("o-a"), completed_saga(other)
    # The first order's reservation waits for its placement; the other order is not held up by it
    assert ids(audit.feed(first[1], second[0])) == ids([second[0]])
    assert ids(audit.feed(first[0])) == ids([first[0], first[1]])
    assert set(audit.held_index().orders) == set()


def test_plain_settings_get_the_default_wait() -> None:
    app: AuditApp = build_app(SETTINGS)
    assert app.causal_wait == WAIT


def test_a_refund_never_overtakes_the_charge_it_refunds() -> None:
    # Given an order cancelled after it was charged, the refund caused by the shipment's cancellation
    placed, reserved, charged, *_ = completed_saga("o-late")
    cancel = Envelope.new(OrderCancellationRequested(reason="no"), order_id="o-late", source=Source.CLIENT)
    closed = cancel.caused(ShipmentCancelled(had_shipment=False, reason="no"), Source.SHIPPING)
    refunded = closed.caused(
        PaymentRefunded(customer_id="c-1", amount=Decimal("43.98"), currency="EUR", reason="no"), Source.PAYMENT
    )
    audit = Harness.for_order("o-late")
    audit.feed(placed, cancel, closed)
    # When payment.events delivers the charge and the refund while inventory.events is read behind,
    # so the charge waits for its cause but the refund's cause is already written
    assert audit.feed(charged, refunded) == []
    # Then the refund is written after the charge, once the charge's cause arrives
    assert ids(audit.feed(reserved)) == ids([reserved, charged, refunded])


def test_failed_refund_attempts_never_overtake_the_charge_and_the_refund_never_overtakes_them() -> None:
    # Given a refund retried twice, and payment.events read before everything else
    saga = refund_retried_saga()
    placed, reserved, charged, granted, failed, attempt_1, attempt_2, refunded, released, cancelled = saga
    audit = Harness.for_order(placed.order_id)
    assert audit.feed(charged, attempt_1, attempt_2, refunded) == []
    # When the rest arrives
    audit.feed(placed, reserved, granted, failed, released, cancelled)
    # Then payment's events keep the order payment published them in, after the failure that caused them
    assert ids(audit.audited()) == ids(saga)

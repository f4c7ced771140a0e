"""Timelines and statuses rendered from hand-built audit trails."""

# ruff: noqa: RUF001 - the timeline writes quantities with a multiplication sign on purpose

from __future__ import annotations

import random

import pytest

from schemas.envelope import Envelope
from services.audit.domain import rejection_of
from services.audit.reader import by_order
from services.audit.timeline import (
    AWAITING_APPROVAL,
    CANCELLED,
    CANCELLING,
    CHARGED,
    COMPLETED,
    PLACED,
    REJECTED,
    RESERVED,
    event_line,
    order_status,
    rfc3339_ms,
    timeline,
)
from tests.audit.builders import (
    T0,
    Harness,
    completed_saga,
    customer_cancelled_saga,
    denied_saga,
    interleave,
    refund_retried_saga,
    refused_cancellation,
    rejected_saga,
    shipping_failed_saga,
    topic_name,
)


def lines(envelopes: list[Envelope]) -> list[str]:
    return timeline(envelopes).splitlines()


def test_a_completed_order_reads_as_a_timeline_with_its_outcome() -> None:
    saga = completed_saga()
    rendered = lines(saga)
    assert rendered[0] == "order o-happy"
    placed = rendered[1]
    assert placed.startswith("  2025-03-01T09:00:00.000Z  client ")
    assert "OrderPlaced" in placed
    assert "WIDGET-1×2 @ 19.99, GADGET-9×1 @ 5.00; total 44.98 EUR; customer c-1; ship to FR" in placed
    assert "inventory" in rendered[2]
    assert "WIDGET-1×2 @ 19.99, GADGET-9×1 @ 5.00" in rendered[2]
    assert "PaymentCharged" in rendered[3]
    assert rendered[3].endswith("44.98 EUR")
    assert "by system; reason: below threshold" in rendered[4]
    assert "dhl shipment s-1 to FR" in rendered[5]
    assert rendered[6].endswith("WIDGET-1×2, GADGET-9×1; total 44.98 EUR; customer c-1")
    assert rendered[-1] == "  outcome: completed"
    assert len(rendered) == len(saga) + 2


def test_times_are_rfc3339_in_utc_with_milliseconds() -> None:
    assert rfc3339_ms(T0.replace(microsecond=123456)) == "2025-03-01T09:00:00.123Z"


def test_a_compensated_order_audited_out_of_order_reads_in_causal_order() -> None:
    # Given a compensated saga, its topics interleaved as they may reach the audit
    saga = shipping_failed_saga()
    topics = [topic_name(event) for event in saga]
    random.Random(7).shuffle(topics)
    shuffled = interleave(saga, topics)
    audit = Harness.for_order(saga[0].order_id)
    audit.feed(*shuffled)
    # When its audit trail is rendered
    rendered = lines(audit.audited())
    # Then each line follows the line of its cause: failure, refund, release, cancellation
    expected = [
        "OrderPlaced",
        "InventoryReserved",
        "PaymentCharged",
        "ApprovalGranted",
        "ShippingFailed",
        "PaymentRefunded",
        "InventoryReleased",
        "OrderCancelled",
    ]
    assert [line.split()[2] for line in rendered[1:-1]] == expected
    assert "reason: no carrier serves AQ" in rendered[5]
    assert "50.00 EUR; reason: shipping failed" in rendered[6]
    assert "WIDGET-1×1; reason: payment refunded" in rendered[7]
    assert rendered[-1] == "  outcome: cancelled: shipping failed: no carrier serves AQ"


def test_failed_refund_attempts_read_in_order_before_the_refund_with_when_they_retry() -> None:
    # Given a refund that failed twice before it succeeded, its topics read in any interleaving
    saga = refund_retried_saga()
    topics = [topic_name(event) for event in saga]
    random.Random(11).shuffle(topics)
    audit = Harness.for_order(saga[0].order_id)
    audit.feed(*interleave(saga, topics))
    # When its audit trail is rendered
    rendered = lines(audit.audited())
    # Then both failures follow the shipping failure in attempt order, and the refund comes after them
    assert [line.split()[2] for line in rendered[1:-1]] == [
        "OrderPlaced",
        "InventoryReserved",
        "PaymentCharged",
        "ApprovalGranted",
        "ShippingFailed",
        "PaymentRefundFailed",
        "PaymentRefundFailed",
        "PaymentRefunded",
        "InventoryReleased",
        "OrderCancelled",
    ]
    assert rendered[6].endswith(
        "50.00 EUR; attempt 1 failed: refund provider unavailable; retry at 2025-03-01T09:00:05.000Z"
    )
    assert "attempt 2 failed: refund provider unavailable; retry at 2025-03-01T09:00:07.000Z" in rendered[7]
    assert rendered[-1] == "  outcome: cancelled: shipping failed: no carrier serves AQ"


def test_status_while_a_refund_is_retried_says_so() -> None:
    saga = refund_retried_saga()
    status = order_status(saga[:6])
    assert status.state == CANCELLING
    assert status.describe() == "cancelling (refund retrying): no carrier serves AQ"
    assert order_status(saga[:8]).describe() == "cancelling (payment refunded): no carrier serves AQ"


def test_reviewers_and_deadlines_are_shown() -> None:
    rendered = lines(denied_saga())
    assert "1200.00 EUR; decide by 2025-03-01T10:00:00.000Z" in rendered[4]
    assert "deny by alice; comment: fraud risk" in rendered[5]
    assert "ApprovalDenied" in rendered[6]
    assert "by alice; comment: fraud risk" in rendered[6]
    assert rendered[-1] == "  outcome: cancelled: approval denied by alice"


def test_a_rejected_reservation_shows_the_shortages() -> None:
    rendered = lines(rejected_saga())
    assert "reason: insufficient stock; short: RARE-1 requested 5 available 2" in rendered[2]
    assert rendered[-1] == "  outcome: cancelled: insufficient stock"


def test_an_unfinished_order_reads_in_progress_with_its_last_step() -> None:
    saga = denied_saga()
    assert lines(saga[:4])[-1] == "  outcome: in progress: awaiting approval"
    assert lines(saga[:7])[-1] == "  outcome: in progress: cancelling (payment refunded): denied by alice: fraud risk"


def rejection(order_id: str, offset: int, reason: str) -> Envelope:
    found = rejection_of("orders", 2, offset, key=order_id.encode(), value=b'{"type": "OrderPlaced"}', reason=reason)
    assert found is not None
    return found


def test_an_order_whose_only_command_was_rejected_reads_as_rejected_with_the_reason() -> None:
    rendered = lines([rejection("o-bad", 7, "data.currency: not an ISO 4217 currency code")])
    assert "OrderCommandRejected" in rendered[1]
    assert "OrderPlaced on orders (partition 2, offset 7): data.currency: not an ISO 4217 currency code" in rendered[1]
    assert rendered[-1].startswith("  outcome: rejected: OrderPlaced on orders")
    assert order_status([rejection("o-bad", 7, "x")]).state == REJECTED


def test_a_rejected_command_beside_a_live_order_is_noted_in_its_status() -> None:
    saga = completed_saga()
    status = order_status([*saga[:3], rejection(saga[0].order_id, 9, "not JSON: Expecting value")])
    assert status.state == CHARGED
    assert status.describe().endswith("a command was rejected: OrderPlaced on orders (partition 2, offset 9): "
                                      "not JSON: Expecting value")  # fmt: skip


def test_an_over_long_reason_is_shortened_to_fit_the_contract() -> None:
    long = rejection("o-long", 1, "x" * 2000)
    assert len(long.to_bytes()) < 2000


def test_an_empty_trail_renders_nothing() -> None:
    assert timeline([]) == ""


def test_a_feed_line_names_the_order() -> None:
    [placed, *_] = completed_saga()
    assert "  o-happy  client " in event_line(placed, with_order=True)
    assert "o-happy" not in event_line(placed)


# --- status ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "state"),
    [(1, PLACED), (2, RESERVED), (3, CHARGED), (4, "approved"), (5, "shipment scheduled"), (6, COMPLETED)],
)
def test_status_follows_the_happy_path(count: int, state: str) -> None:
    saga = completed_saga()
    status = order_status(saga[:count])
    assert status.state == state
    assert status.last_event == saga[count - 1]
    assert status.finished == (state == COMPLETED)


def test_status_of_an_order_awaiting_a_reviewer() -> None:
    status = order_status(denied_saga()[:4])
    assert status.state == AWAITING_APPROVAL
    assert status.describe() == "awaiting approval"


def test_status_of_a_cancelled_order_gives_the_reason() -> None:
    status = order_status(shipping_failed_saga())
    assert (status.state, status.reason) == (CANCELLED, "shipping failed: no carrier serves AQ")
    assert status.describe() == "cancelled: shipping failed: no carrier serves AQ"


def test_status_while_compensating_names_the_trigger_and_the_step() -> None:
    status = order_status(shipping_failed_saga()[:6])
    assert status.state == CANCELLING
    assert status.describe() == "cancelling (payment refunded): no carrier serves AQ"


def test_status_of_a_customer_cancellation_in_flight() -> None:
    saga = customer_cancelled_saga()
    assert order_status(saga[:2]).describe() == "placed; cancellation requested"
    assert order_status(saga[:4]).describe() == "cancelling (payment voided): cancellation requested: changed my mind"
    assert order_status(saga).describe() == "cancelled: changed my mind"


def test_status_of_a_completed_order_whose_cancellation_was_refused() -> None:
    saga = completed_saga()
    status = order_status(saga + refused_cancellation(saga))
    assert status.state == COMPLETED
    assert status.cancellation_refused == "order already completed"
    assert status.describe() == "completed; cancellation refused: order already completed"
    assert status.last_event.type == "OrderCancellationRefused"
    assert lines(saga + refused_cancellation(saga))[-1] == (
        "  outcome: completed; cancellation refused: order already completed"
    )


def test_status_needs_events() -> None:
    with pytest.raises(ValueError, match="at least one event"):
        order_status([])


def test_orders_are_grouped_oldest_first_each_in_audit_order() -> None:
    happy = completed_saga("o-1")
    later = [event.model_copy(update={"occurred_at": event.occurred_at.replace(hour=10)}) for event in rejected_saga()]
    mixed = [later[0], happy[0], later[1], happy[1], later[2], *happy[2:]]
    grouped = by_order(mixed)
    assert list(grouped) == ["o-1", "o-rejected"]
    assert grouped["o-1"] == happy
    assert grouped["o-rejected"] == later

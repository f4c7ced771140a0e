"""The hop table's arithmetic, on events given rather than read from a broker."""

from __future__ import annotations

from benchmarks.hops import Sent, hops, last_latency_run


def test_each_hop_is_timed_from_the_event_before_it_in_the_order_of_sending() -> None:
    by_order = {
        "l6-abc-000001": [
            Sent("InventoryReserved", sent_ms=1050, handled_ms=1040.0),
            Sent("OrderPlaced", sent_ms=1000, handled_ms=None),
            Sent("PaymentCharged", sent_ms=1120, handled_ms=1100.0),
        ],
        "s3-abc-000001": [Sent("OrderPlaced", sent_ms=0, handled_ms=None), Sent("InventoryReserved", 9, 9.0)],
    }
    found = hops(by_order, "l6-abc-")
    assert set(found) == {"OrderPlaced -> InventoryReserved", "InventoryReserved -> PaymentCharged"}
    reserved = found["OrderPlaced -> InventoryReserved"]
    assert (reserved.sent_to_sent, reserved.sent_to_handled, reserved.handled_to_sent) == ([50], [40.0], [10.0])
    charged = found["InventoryReserved -> PaymentCharged"]
    assert (charged.sent_to_sent, charged.sent_to_handled, charged.handled_to_sent) == ([70], [50.0], [20.0])


def test_the_orders_read_by_default_are_those_of_the_last_latency_run() -> None:
    by_order = {
        "l6-abc-000001": [Sent("OrderPlaced", 1000, None)],
        "l9-def-000001": [Sent("OrderPlaced", 5000, None)],
        "s9-def-000001": [Sent("OrderPlaced", 9000, None)],
    }
    assert last_latency_run(by_order) == "l9-def-"

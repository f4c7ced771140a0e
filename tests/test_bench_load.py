"""The benchmark's load generator: what its watcher counts as an order's end, and its clients on the broker."""

from __future__ import annotations

import json
import random

from confluent_kafka import OFFSET_BEGINNING
from confluent_kafka import TopicPartition as ConfluentPartition

from benchmarks import load_cost, raw_pipeline
from benchmarks.saga_bench import OFFER_TICK_S, OUTCOMES, Ended, Offer, OpenOrders, Watcher, plan_orders
from services.common.kafka import confluent_consumer, partition_for
from services.common.settings import ChoreoSettings

ENDED = Ended("OrderCompleted", 1.0)
AT = "2026-12-07T00:00:00Z"


def test_open_orders_follow_a_growing_list_and_drop_the_ended() -> None:
    ended: dict[str, Ended] = {}
    sent = ["a", "b"]
    still_open = OpenOrders(ended, sent)
    assert still_open.count() == 2

    ended["a"] = ENDED
    sent += ["c", "d"]
    assert still_open.count() == 3

    ended.update(b=ENDED, c=ENDED, d=ENDED)
    assert still_open.count() == 0


def _record(kind: str, order_id: str, **fields: str) -> bytes:
    return json.dumps({"type": kind, "order_id": order_id, "occurred_at": AT, **fields}).encode()


def _watcher() -> Watcher:
    return Watcher(ChoreoSettings(bootstrap_servers="127.0.0.1:1", environment="test"), "audit", raw=False)


def test_the_watcher_ends_an_order_on_its_terminal_event_and_keeps_its_failure() -> None:
    watcher = _watcher()
    watcher._take(_record("PaymentDeclined", "o-1"))
    assert "o-1" not in watcher.ended

    watcher._take(_record("OrderCancelled", "o-1"))

    assert watcher.ended["o-1"].type == "OrderCancelled"
    assert watcher.ended["o-1"].failure_s == watcher.ended["o-1"].end_s


def test_the_watcher_skips_other_events_even_when_their_bytes_name_a_terminal_type() -> None:
    watcher = _watcher()
    watcher._take(_record("InventoryReserved", "o-2", note="OrderCompleted"))
    watcher._take(b"not json, but it says OrderCompleted")
    assert watcher.ended == {}

    watcher._take(_record("OrderCompleted", "o-2"))

    assert list(watcher.ended) == ["o-2"]


OFFERED_RATE = 2000.0


async def test_the_offer_places_each_order_once_on_its_keys_partition_and_the_watcher_sees_each(
    choreo_settings: ChoreoSettings,
) -> None:
    await raw_pipeline.create_topics(choreo_settings)
    topic = raw_pipeline.hop_topic(choreo_settings.topic_prefix, 0)
    orders = plan_orders("p", 300, {**dict.fromkeys(OUTCOMES, 0), "completed": 1}, random.Random(7))
    offer, watcher = Offer(choreo_settings, topic, raw=True), Watcher(choreo_settings, topic, raw=True)
    await watcher.start()
    await offer.start()
    try:
        placed: dict[str, float] = {}
        sent: list[str] = []
        await offer.publish(orders, OFFERED_RATE, placed, sent)
        assert sent == [order.order_id for order in orders]
        assert set(placed) == set(sent)
        # Paced, in ticks: not all at once.
        assert max(placed.values()) - min(placed.values()) >= (len(orders) - 1) / OFFERED_RATE - OFFER_TICK_S
        assert await watcher.wait_for(sent, 30, lambda: None)
    finally:
        await offer.stop()
        await watcher.stop()
    assert watcher.records == len(orders)
    assert _partitions_of(choreo_settings, topic, len(orders)) == {
        order.order_id: partition_for(order.order_id.encode(), choreo_settings.partitions) for order in orders
    }


def _partitions_of(settings: ChoreoSettings, topic: str, count: int) -> dict[str, int | None]:
    consumer = confluent_consumer(settings, "unused")
    try:
        consumer.assign([ConfluentPartition(topic, n, OFFSET_BEGINNING) for n in range(settings.partitions)])
        found: dict[str, int | None] = {}
        for _ in range(100):
            for record in consumer.consume(count, 0.2):
                found[(record.key() or b"").decode()] = record.partition()
            if len(found) >= count:
                break
        return found
    finally:
        consumer.close()


async def test_the_generators_cost_is_measured_over_every_saga_it_offered(choreo_settings: ChoreoSettings) -> None:
    cost = await load_cost.measure(choreo_settings, sagas=40, rate=400.0, broker_pid=None)

    assert (cost.sagas, cost.ended) == (40, 40)
    assert cost.generator_ms > 0
    assert cost.broker_ms is None

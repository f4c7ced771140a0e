"""A client's record on another partition than its key's, as librdkafka's and kcat's default partitioner
put it: the topic's router forwards it to the right partition in the same transaction; no reader
dead-letters it or acts on it where it is. (No broker: the apps through their real TaskContext.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from schemas.envelope import Envelope, Source
from schemas.events import Address, ApprovalDecisionSubmitted, OrderLine, OrderPlaced
from schemas.topics import APPROVAL_DECISIONS, ORDERS, Topic
from services.approval.app import build_app as build_approval
from services.approval.settings import ApprovalSettings
from services.audit.app import build_app as build_audit
from services.common.kafka import default_partitioner, partition_for
from services.common.processor import FORWARDED_FROM_HEADER
from services.common.settings import ChoreoSettings
from services.inventory.app import build_app as build_inventory
from services.inventory.settings import InventorySettings
from services.shipping.app import build_app as build_shipping
from services.shipping.settings import ShippingSettings
from tests.app_harness import AppHarness

ORDER_ID = "o-routed"


def placed() -> Envelope:
    event = OrderPlaced(
        customer_id="cust-1",
        items=[OrderLine.model_validate({"sku": "WIDGET-1", "quantity": 1, "unit_price": "10.00"})],
        currency="EUR",
        ship_to=Address(country="FR"),
    )
    return Envelope.new(event, order_id=ORDER_ID, source=Source.CLIENT)


def decision() -> Envelope:
    event = ApprovalDecisionSubmitted(approved=True, reviewer="rita")
    return Envelope.new(event, order_id=ORDER_ID, source=Source.CLIENT)


ROUTERS = [
    pytest.param(build_inventory, InventorySettings(_env_file=None), ORDERS, placed, id="inventory routes orders"),
    pytest.param(
        build_approval, ApprovalSettings(_env_file=None), APPROVAL_DECISIONS, decision, id="approval routes decisions"
    ),
]


@pytest.mark.parametrize(("build", "settings", "topic", "command"), ROUTERS)
def test_the_router_forwards_a_misplaced_command_unchanged_to_its_keys_partition(
    build: Callable[[Any], Any], settings: ChoreoSettings, topic: Topic, command: Callable[[], Envelope]
) -> None:
    # Given a valid client command on a partition other than its key's
    app = AppHarness(settings, build)
    envelope = command()
    right = app.partition(ORDER_ID)
    wrong = (right + 1) % settings.partitions
    headers = (*envelope.headers(), ("client-header", b"kept"))
    # When its topic's router reads it there
    outs = app.feed_raw(topic, envelope.key, envelope.to_bytes(), wrong, headers=headers)
    # Then one record goes out: the same key, bytes and headers on the right partition, saying where it came from
    [forwarded] = outs
    assert (forwarded.topic, forwarded.partition, forwarded.key) == (settings.topic(topic), right, ORDER_ID)
    assert forwarded.value == envelope.to_bytes()
    assert forwarded.headers[: len(headers)] == headers
    assert dict(forwarded.headers)[FORWARDED_FROM_HEADER] == f"{wrong}:0".encode()
    # and nothing was acted on where it was misplaced
    assert app.changelog[wrong] == []


READERS = [
    pytest.param(build_shipping, ShippingSettings(_env_file=None), ORDERS, placed, id="shipping on orders"),
    pytest.param(build_audit, ChoreoSettings(_env_file=None), ORDERS, placed, id="audit on orders"),
    pytest.param(build_approval, ApprovalSettings(_env_file=None), ORDERS, placed, id="approval on orders"),
    pytest.param(build_audit, ChoreoSettings(_env_file=None), APPROVAL_DECISIONS, decision, id="audit on decisions"),
]


@pytest.mark.parametrize(("build", "settings", "topic", "command"), READERS)
def test_other_readers_skip_a_misplaced_command_and_wait_for_the_forwarded_copy(
    build: Callable[[Any], Any], settings: ChoreoSettings, topic: Topic, command: Callable[[], Envelope]
) -> None:
    app = AppHarness(settings, build)
    envelope = command()
    wrong = (app.partition(ORDER_ID) + 1) % settings.partitions
    assert app.feed_raw(topic, envelope.key, envelope.to_bytes(), wrong, headers=envelope.headers()) == []
    assert app.changelog[wrong] == []


def test_an_invalid_command_is_dead_lettered_by_its_router_only() -> None:
    # Given an invalid client command on its key's partition
    bad = b'{"type": "OrderPlaced", "order_id": "o-routed"}'
    inventory = AppHarness(InventorySettings(_env_file=None), build_inventory)
    shipping = AppHarness(ShippingSettings(_env_file=None), build_shipping)
    partition = inventory.partition(ORDER_ID)
    # When the router and another reader read it
    [letter] = inventory.feed_raw(ORDERS, ORDER_ID.encode(), bad, partition)
    # Then one dead letter, from the router, with the reason
    assert letter.dead_letter is not None
    assert letter.dead_letter.consumer == "inventory"
    assert "event_id" in letter.dead_letter.reason
    assert shipping.feed_raw(ORDERS, ORDER_ID.encode(), bad, partition) == []


def test_the_remembered_partitioner_picks_what_kafkas_default_partitioner_picks() -> None:
    partitions = list(range(6))
    keys = [f"o-{n}".encode() for n in range(500)] + [b"", b"\xff\x00", "ünïcode".encode()]
    for key in keys * 2:  # the second round reads the remembered hashes
        expected = DefaultPartitioner()(key, partitions, partitions)
        assert default_partitioner(key, partitions, partitions) == expected
        assert partition_for(key, len(partitions)) == expected
    assert default_partitioner(None, partitions, [4]) == 4  # no key: an available partition

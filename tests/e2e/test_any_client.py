"""Clients in their default configuration, on the real broker with the saga running: librdkafka's and
kcat's default partitioner (consistent_random, CRC32) puts most keys on another partition than Kafka's
murmur2. Every command still runs once, nothing is dead-lettered, and an invalid command shows on its
order's timeline."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from confluent_kafka import Producer

from schemas.envelope import Envelope, Source
from schemas.events import Address, ApprovalDecisionSubmitted, OrderLine, OrderPlaced
from schemas.topics import APPROVAL_DECISIONS, DEAD_LETTER, ORDERS, Topic
from services.common.processor import FORWARDED_FROM_HEADER
from services.common.settings import ChoreoSettings
from tests.e2e.harness import SagaStack, audit_by_order, wait_for_events
from tests.support import choreo, eventually, read_topic

DONE = ("OrderCompleted",)


def order(order_id: str, unit_price: str = "10.00") -> Envelope:
    placed = OrderPlaced(
        customer_id=f"cust-{order_id}",
        items=[OrderLine(sku="WIDGET-1", quantity=1, unit_price=Decimal(unit_price))],
        currency="EUR",
        ship_to=Address(country="DE"),
    )
    return Envelope.new(placed, order_id=order_id, source=Source.CLIENT)


def librdkafka_publish(settings: ChoreoSettings, topic: Topic, envelopes: list[Envelope]) -> None:
    """Publish as a confluent-kafka-python user would: the default configuration, the key set."""
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for envelope in envelopes:
        producer.produce(settings.topic(topic), envelope.to_bytes(), key=envelope.key)
    assert producer.flush(30) == 0


def kcat_publish(settings: ChoreoSettings, topic: Topic, envelopes: list[Envelope]) -> None:
    kcat = shutil.which("kcat")
    assert kcat is not None, "kcat is missing: `make setup` installs it (Debian package kcat)"
    lines = "".join(f"{e.order_id}~{e.to_bytes().decode()}\n" for e in envelopes)
    command = [kcat, "-b", settings.bootstrap_servers, "-P", "-t", settings.topic(topic), "-K", "~"]
    result = subprocess.run(command, input=lines, text=True, capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


@pytest.fixture
async def stack(choreo_settings: ChoreoSettings) -> AsyncIterator[SagaStack]:
    overrides: dict[str, dict[str, Any]] = {"approval": {"approval_timeout": 3600}}
    async with SagaStack(choreo_settings, overrides) as running:
        await running.start()
        yield running


async def forwarded_ids(settings: ChoreoSettings) -> set[str]:
    return {
        record.key.decode()
        for record in await read_topic(settings, ORDERS)
        if any(name == FORWARDED_FROM_HEADER for name, _ in record.headers)
    }


async def test_orders_from_default_clients_all_complete_once(stack: SagaStack, choreo_settings: ChoreoSettings) -> None:
    # Given twelve orders from confluent-kafka-python and six from kcat, both in their default configuration
    by_librdkafka = [order(f"o-rdk-{n}") for n in range(12)]
    by_kcat = [order(f"o-kcat-{n}") for n in range(6)]
    await asyncio.to_thread(librdkafka_publish, choreo_settings, ORDERS, by_librdkafka)
    await asyncio.to_thread(kcat_publish, choreo_settings, ORDERS, by_kcat)
    placed = by_librdkafka + by_kcat
    # Then every one completes, once
    for envelope in placed:
        await wait_for_events(choreo_settings, envelope.order_id, *DONE)
    await stack.settle()
    timelines = await audit_by_order(choreo_settings)
    for envelope in placed:
        types = [e.type for e in timelines[envelope.order_id]]
        assert types.count("OrderPlaced") == 1, types
        assert types.count("OrderCompleted") == 1, types
    # and most of them had been written to another partition than their key's, and were forwarded
    forwarded = await forwarded_ids(choreo_settings)
    assert len(forwarded & {e.order_id for e in by_librdkafka}) >= 4
    assert forwarded & {e.order_id for e in by_kcat}
    assert await read_topic(choreo_settings, DEAD_LETTER) == []


async def test_a_decision_from_a_default_client_reaches_its_order(
    stack: SagaStack, choreo_settings: ChoreoSettings
) -> None:
    # Given orders over the approval threshold, waiting for a reviewer
    big = [order(f"o-big-{n}", unit_price="1500.00") for n in range(4)]
    await asyncio.to_thread(librdkafka_publish, choreo_settings, ORDERS, big)
    for envelope in big:
        await wait_for_events(choreo_settings, envelope.order_id, "ApprovalRequested")
    # When a confluent-kafka-python client publishes each decision with its default partitioner
    decisions = [
        Envelope.new(
            ApprovalDecisionSubmitted(approved=True, reviewer="rita"), order_id=e.order_id, source=Source.CLIENT
        )
        for e in big
    ]
    await asyncio.to_thread(librdkafka_publish, choreo_settings, APPROVAL_DECISIONS, decisions)
    # Then every order is granted and completes, and nothing is dead-lettered
    for envelope in big:
        assert "ApprovalGranted" in await wait_for_events(choreo_settings, envelope.order_id, *DONE)
    assert await read_topic(choreo_settings, DEAD_LETTER) == []


async def test_an_invalid_command_is_rejected_on_its_orders_timeline(
    stack: SagaStack, choreo_settings: ChoreoSettings
) -> None:
    # Given a client command that fails validation, keyed by its order id, sent with a default client
    invalid = order("o-invalid").model_dump(mode="json")
    invalid["data"]["currency"] = "EURO"
    producer = Producer({"bootstrap.servers": choreo_settings.bootstrap_servers})
    producer.produce(choreo_settings.topic(ORDERS), json.dumps(invalid).encode(), key=b"o-invalid")
    assert producer.flush(30) == 0
    # Then the audit shows its rejection with the reason, and the dead-letter topic keeps it once
    await wait_for_events(choreo_settings, "o-invalid", "OrderCommandRejected")
    status = choreo(choreo_settings, "status", "o-invalid")
    assert status.returncode == 0, status.stderr
    assert "rejected" in status.stdout
    assert "data.currency" in status.stdout
    audit = choreo(choreo_settings, "audit", "--order", "o-invalid")
    assert "OrderCommandRejected" in audit.stdout, audit.stdout
    letters = await eventually(lambda: read_topic(choreo_settings, DEAD_LETTER), lambda found: len(found) >= 1)
    await stack.settle()
    assert len(await read_topic(choreo_settings, DEAD_LETTER)) == len(letters) == 1

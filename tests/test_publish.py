"""`choreo publish` and outside clients against the real broker."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from schemas.envelope import Envelope
from schemas.events import OrderCancellationRequested, OrderPlaced
from schemas.topics import ORDERS
from services.common.kafka import partition_for
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from tests.support import choreo, read_topic

EXAMPLE = Path(__file__).resolve().parents[1] / "schemas" / "examples" / "OrderPlaced.json"


@pytest.fixture
async def orders_topic(choreo_settings: ChoreoSettings) -> ChoreoSettings:
    await ensure_topics(choreo_settings, [ORDERS])
    return choreo_settings


async def test_an_order_from_flags_round_trips(orders_topic: ChoreoSettings) -> None:
    result = choreo(
        orders_topic,
        "publish", "order", "--order-id", "o-flags", "--customer", "cust-1",
        "--item", "WIDGET-1:2:19.99", "--item", "GADGET-7:1:249.00", "--currency", "EUR",
        "--country", "DE", "--city", "Berlin",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    receipt = json.loads(result.stdout)

    [record] = await read_topic(orders_topic, ORDERS)
    envelope = Envelope.from_bytes(record.value)
    assert record.key == b"o-flags"
    assert record.partition == partition_for(b"o-flags", orders_topic.partitions) == receipt["partition"]
    assert str(envelope.event_id) == receipt["event_id"]
    assert envelope.source == "client"
    assert envelope.causation_id is None
    assert isinstance(envelope.data, OrderPlaced)
    assert [(line.sku, line.quantity, str(line.unit_price)) for line in envelope.data.items] == [
        ("WIDGET-1", 2, "19.99"),
        ("GADGET-7", 1, "249.00"),
    ]
    assert envelope.data.ship_to.city == "Berlin"


async def test_an_order_from_a_file_and_from_stdin(orders_topic: ChoreoSettings, tmp_path: Path) -> None:
    data = json.loads(EXAMPLE.read_text())["data"]
    path = tmp_path / "order.json"
    path.write_text(json.dumps(data))
    assert choreo(orders_topic, "publish", "order", "--file", str(path), "--order-id", "o-file").returncode == 0
    from_stdin = choreo(orders_topic, "publish", "order", "--file", "-", stdin=EXAMPLE.read_text())
    assert from_stdin.returncode == 0, from_stdin.stderr

    envelopes = {
        Envelope.from_bytes(r.value).order_id: Envelope.from_bytes(r.value)
        for r in await read_topic(orders_topic, ORDERS)
    }
    assert set(envelopes) == {"o-file", "order-1001"}
    assert envelopes["o-file"].data == envelopes["order-1001"].data


async def test_a_cancellation(orders_topic: ChoreoSettings) -> None:
    result = choreo(orders_topic, "publish", "cancel", "o-9", "--reason", "changed my mind")
    assert result.returncode == 0, result.stderr
    [record] = await read_topic(orders_topic, ORDERS)
    envelope = Envelope.from_bytes(record.value)
    assert isinstance(envelope.data, OrderCancellationRequested)
    assert envelope.data.reason == "changed my mind"


@pytest.mark.parametrize(
    ("arguments", "stdin", "names"),
    [
        (["--item", "WIDGET-1:1:1.00", "--country", "DE"], None, "--customer"),
        (["--customer", "c", "--item", "WIDGET-1:0:1.00", "--country", "DE"], None, "data.items.0.quantity"),
        (["--customer", "c", "--item", "WIDGET-1:1:1.00", "--country", "XX"], None, "data.ship_to.country"),
        (["--customer", "c", "--item", "WIDGET-1:1", "--country", "DE"], None, "SKU:QTY:PRICE"),
        (["--file", "-"], "{not json", "not JSON"),
        (["--file", "-"], '{"customer_id": "c", "currency": "EUR", "ship_to": {"country": "DE"}}', "data.items"),
    ],
)
async def test_bad_input_is_refused_and_nothing_is_published(
    orders_topic: ChoreoSettings, arguments: list[str], stdin: str | None, names: str
) -> None:
    result = choreo(orders_topic, "publish", "order", *arguments, stdin=stdin)
    assert result.returncode == 2
    assert names in result.stderr
    assert await read_topic(orders_topic, ORDERS) == []


async def test_kcat_publishes_a_hand_written_order_that_validates(orders_topic: ChoreoSettings) -> None:
    kcat = shutil.which("kcat")
    assert kcat is not None, "kcat is missing: `make setup` installs it (Debian package kcat)"
    subprocess.run(
        [kcat, "-b", orders_topic.bootstrap_servers, "-P", "-t", orders_topic.topic(ORDERS), "-k", "order-1001",
         "-X", "partitioner=murmur2_random"],
        input=EXAMPLE.read_bytes().strip() + b"\n",
        check=True,
        timeout=30,
    )  # fmt: skip
    [record] = await read_topic(orders_topic, ORDERS)
    envelope = Envelope.from_bytes(record.value)
    assert envelope.order_id == "order-1001"
    assert record.key == b"order-1001"
    assert record.partition == partition_for(b"order-1001", orders_topic.partitions)
    assert isinstance(envelope.data, OrderPlaced)

    read_back = subprocess.run(
        [kcat, "-b", orders_topic.bootstrap_servers, "-C", "-t", orders_topic.topic(ORDERS), "-o", "beginning",
         "-e", "-q", "-f", "%s\n"],
        capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    assert Envelope.from_bytes(read_back.stdout.strip()) == envelope

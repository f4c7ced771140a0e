"""`choreo deadletter` on the real broker: list and its filters, show, replay, the dry run and the replay limit."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from aiokafka import TopicPartition

from schemas.deadletter import REPLAY_COUNT
from schemas.topics import DEAD_LETTER, ORDERS, PAYMENT_EVENTS
from services.common.deadletters import LetterId
from services.common.kafka import partition_for
from services.common.kafka import producer as make_producer
from services.common.processor import Incoming, TaskContext
from services.common.settings import ChoreoSettings
from services.common.state import KeyedStore
from services.common.topics import ensure_topics
from tests.e2e.harness import SagaStack
from tests.support import choreo, end_offsets, eventually, read_topic

NOT_JSON = b"{not json"


Record = tuple[str, bytes | None, bytes | None, list[Any]]
"""Topic, key, value and headers."""


async def produce(settings: ChoreoSettings, records: Sequence[Record]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for topic, key, value, headers in records:
            await producer.send(topic, value, key=key, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


async def dead_letter(settings: ChoreoSettings, rejected: Sequence[tuple[Incoming, str, str]]) -> None:
    """Write dead letters the way a service does: `TaskContext.dead_letter`, then its outbox."""
    records: list[Record] = []
    for message, consumer, reason in rejected:
        task = TaskContext(message.partition, settings, consumer, KeyedStore())
        task.dead_letter(message, reason)
        records += [(out.topic, out.key, out.value, list(out.headers)) for out in task.outbox]
    await produce(settings, records)


async def dead_letter_ids(settings: ChoreoSettings) -> list[str]:
    return [str(LetterId(row.partition, row.offset)) for row in await read_topic(settings, DEAD_LETTER)]


def origins(lines: list[str]) -> list[str]:
    """The origin column (`topic[partition]@offset`) of each line of `deadletter list`."""
    return sorted(line.split()[1] for line in lines)


async def orders_ends(settings: ChoreoSettings) -> dict[TopicPartition, int]:
    name = settings.topic(ORDERS)
    return await end_offsets(settings, [TopicPartition(name, p) for p in range(settings.partitions)])


async def test_list_filters_by_reason_topic_consumer_and_time(choreo_settings: ChoreoSettings) -> None:
    # Given three dead letters from two services and two topics, the last written after `middle`
    settings = choreo_settings
    await ensure_topics(settings)
    orders = settings.topic(ORDERS)
    payments = settings.topic(PAYMENT_EVENTS)
    await dead_letter(
        settings,
        [
            (Incoming(ORDERS, 1, 101, b"o-1", NOT_JSON, 0), "inventory", "not JSON: Expecting property name"),
            (Incoming(PAYMENT_EVENTS, 2, 102, b"o-2", b"{}", 0), "shipping", "type: unknown event type None"),
        ],
    )
    middle = datetime.now(UTC)
    while datetime.now(UTC) <= middle:
        pass  # the next dead letter's time must come strictly after it
    await dead_letter(
        settings,
        [(Incoming(ORDERS, 3, 103, b"o-3", b"{}", 0), "payment", "key: the record key must equal order_id 'o-9'")],
    )
    first, second, third = f"{orders}[1]@101", f"{payments}[2]@102", f"{orders}[3]@103"

    def listed(*filters: str) -> list[str]:
        result = choreo(settings, "deadletter", "list", *filters)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    # Then each filter keeps exactly its dead letters
    assert origins(listed()) == sorted([first, second, third])
    assert origins(listed("--reason", "NOT json")) == [first]
    assert origins(listed("--topic", "orders")) == sorted([first, third])
    assert origins(listed("--topic", payments)) == [second]
    assert origins(listed("--since", middle.isoformat())) == [third]
    assert origins(listed("--until", middle.isoformat())) == sorted([first, second])
    assert origins(listed("--until", "1h")) == []
    assert origins(listed("--topic", "orders", "--until", middle.isoformat())) == [first]
    # And each line starts with its id on the dead-letter topic, then the origin, the consumer and the time
    [line] = listed("--consumer", "payment")
    letter_id, origin, consumer, moment, *reason = line.split()
    assert letter_id in await dead_letter_ids(settings)
    assert (origin, consumer, " ".join(reason)) == (third, "payment", "key: the record key must equal order_id 'o-9'")
    assert datetime.fromisoformat(moment) >= middle.replace(microsecond=middle.microsecond // 1000 * 1000)
    # And --json gives the same dead letters, one object a line
    result = choreo(settings, "deadletter", "list", "--json", "--reason", "record key")
    [document] = [json.loads(text) for text in result.stdout.splitlines()]
    assert (document["topic"], document["offset"], document["consumer"]) == (orders, 103, "payment")
    assert base64.b64decode(document["key_base64"]) == b"o-3"
    assert document["replay_count"] == 0


async def test_show_decodes_the_original_record(choreo_settings: ChoreoSettings) -> None:
    # Given a dead letter whose value is JSON (with headers) and one whose value is not text
    settings = choreo_settings
    await ensure_topics(settings)
    document = b'{"order_id":"o-1","items":[{"sku":"sku-a","quantity":0}]}'
    headers = (("ce_type", b"OrderPlaced"), ("x-trace", b"\xff\x01"))
    await dead_letter(
        settings,
        [
            (Incoming(ORDERS, 0, 7, b"o-1", document, 0, headers), "inventory", "data.items.0.quantity: too small"),
            (Incoming(ORDERS, 0, 8, b"o-2", b"\xff\x00", 0), "inventory", "not JSON: invalid start byte"),
        ],
    )
    ids = await dead_letter_ids(settings)
    # When both are shown
    result = choreo(settings, "deadletter", "show", *ids)
    # Then each shows its reason, origin, headers, key and value, the JSON one pretty-printed
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "reason:    data.items.0.quantity: too small" in out
    assert f"origin:    {settings.topic(ORDERS)} partition 0 offset 7" in out
    assert "key:       'o-1'" in out
    assert "    ce_type: 'OrderPlaced'\n" in out
    assert "    x-trace: base64:/wE=\n" in out
    assert '  value (JSON):\n    {\n      "order_id": "o-1",\n      "items": [' in out
    assert "value:     base64:/wA=" in out
    # And an id with nothing there is named, with a failing exit status
    missing = choreo(settings, "deadletter", "show", "0:999")
    assert missing.returncode == 1
    assert "no dead letter at 0:999" in missing.stderr


async def test_a_dead_lettered_order_is_replayed_and_refused_at_the_limit(choreo_settings: ChoreoSettings) -> None:
    settings = choreo_settings
    async with SagaStack(settings) as stack:
        await stack.start("inventory", "audit")
        # Given a malformed order (with a header of its own) that the running inventory (its topic's router)
        # dead-letters, and audit puts on the order's timeline
        key = b"o-bad"
        await produce(settings, [(settings.topic(ORDERS), key, NOT_JSON, [("x-request-id", b"r-1")])])
        first = await eventually(lambda: dead_letter_ids(settings), lambda ids: len(ids) == 1)
        listing = choreo(settings, "deadletter", "list", "--consumer", "inventory")
        [by_inventory] = [line.split()[0] for line in listing.stdout.splitlines()]
        before = await orders_ends(settings)

        # When its replay is only tried
        dry = choreo(settings, "deadletter", "replay", "--dry-run", by_inventory)
        # Then it says what it would send, and the orders topic does not move
        assert dry.returncode == 0, dry.stderr
        assert f"would send {by_inventory} to {settings.topic(ORDERS)} partition" in dry.stdout
        assert "would send 1, refused 0, skipped 0; dry run, nothing was sent" in dry.stdout
        assert await orders_ends(settings) == before

        # When the dead letters of the orders topic are replayed
        sent = choreo(settings, "deadletter", "replay", "--topic", "orders")
        # Then the record goes back once
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "sent 1, refused 0, skipped 0" in sent.stdout
        # And exactly its bytes are back on orders, where its key belongs, with its header and a replay count
        records = await read_topic(settings, ORDERS)
        [replayed] = [r for r in records if r.offset >= before[TopicPartition(r.topic, r.partition)]]
        assert (replayed.key, replayed.value) == (key, NOT_JSON)
        assert replayed.partition == partition_for(key, settings.partitions)
        assert list(replayed.headers) == [("x-request-id", b"r-1"), (REPLAY_COUNT, b"1")]

        # And it is dead-lettered again, keeping the count, so the limit holds across cycles
        ids = await eventually(lambda: dead_letter_ids(settings), lambda found: len(found) == 2)
        second = [letter_id for letter_id in ids if letter_id not in first]
        shown = choreo(settings, "deadletter", "show", *second)
        assert shown.stdout.count("replays:   1") == 1
        assert shown.stdout.count(f"    {REPLAY_COUNT}: '1'") == 1
        listing = choreo(settings, "deadletter", "list", "--consumer", "inventory")
        assert "(replay 1) not JSON" in listing.stdout

        # When those are replayed with a limit of one replay
        after = await orders_ends(settings)
        refused = choreo(settings, "deadletter", "replay", "--max-replays", "1", *second)
        # Then the record is refused, with the reason, and nothing is sent
        assert refused.returncode == 1
        assert "replayed 1 time already (limit 1, --max-replays)" in refused.stdout
        assert "sent 0, refused 1, skipped 0" in refused.stdout
        assert await orders_ends(settings) == after

"""Where faust-streaming 0.15.3 falls short of what the monitor relies on.

One more, that faust's consumer reads records of aborted transactions unless
processing_guarantee="exactly_once", is shown in test_monitor_kafka.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.transport.producer import ProducerBuffer

from schemas.topics import AUDIT, MONITOR_STATE
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from services.monitor.store import PartitionedTable, TableStore
from tests.support import eventually, read_topic


async def test_faust_producer_flush_returns_while_records_are_still_buffered() -> None:
    """`Producer.flush()` waits at most 0.1 s per record, so it is no durability barrier."""
    buffer = ProducerBuffer()
    buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))  # type: ignore[assignment]
    sent: list[Any] = []

    async def slow_send(message: Any) -> None:  # a send waiting for metadata or a leader
        await asyncio.sleep(0.3)
        sent.append(message)

    buffer._send_pending = slow_send  # type: ignore[method-assign,assignment]
    await buffer.start()
    try:
        for number in range(3):
            buffer.put(number)  # type: ignore[arg-type]
        await buffer.flush()
        assert buffer.size > 0  # flush() returned, yet records are still waiting to be sent
        assert len(sent) < 3
    finally:
        # Let the buffer drain before stopping it: its on_stop refuses to stop with records left.
        await eventually(lambda: asyncio.sleep(0, len(sent)), lambda count: count == 3, timeout=5, interval=0.05)
        await buffer.stop()


def test_a_faust_table_cannot_be_written_from_a_timer() -> None:
    """Outside stream iteration faust has no partition for a changelog write; PartitionedTable takes one."""
    app = faust.App("limits-test", broker="kafka://127.0.0.1:1", store="memory://")
    table = app.Table("state", key_type=bytes, value_type=bytes)
    with pytest.raises(TypeError, match="outside of stream iteration"):
        table[b"service:x"] = b"{}"
    partitioned = PartitionedTable(app, name="partitioned", key_type=bytes, value_type=bytes)
    app.tables.add(partitioned)
    with pytest.raises(RuntimeError, match="names the partition"):
        partitioned[b"service:x"] = b"{}"


async def test_under_exactly_once_a_table_write_from_a_timer_never_commits(
    choreo_settings: ChoreoSettings, tmp_path: Path
) -> None:
    """faust commits a transaction only with input offsets: with `audit` idle, a timer's writes stay invisible.

    Acknowledged by the broker, yet never committed: a read_committed reader (and the monitor's own
    restore after a crash) would not see a single health check. So the monitor runs at_least_once
    and makes each effect idempotent instead.
    """
    settings = choreo_settings
    await ensure_topics(settings, [AUDIT, MONITOR_STATE])
    app = faust.App(
        settings.group("eos-limit"),
        broker=f"kafka://{settings.bootstrap_servers}",
        processing_guarantee="exactly_once",
        store="memory://",
        datadir=tmp_path,
        topic_partitions=settings.partitions,
        topic_allow_declare=False,
        topic_disable_leader=True,
        web_enabled=False,
    )
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    audit = app.topic(settings.topic(AUDIT), **raw)
    changelog = app.topic(
        settings.topic(MONITOR_STATE), **raw, partitions=settings.partitions, compacting=True, allow_empty=True
    )
    table = PartitionedTable(
        app,
        name="state",
        changelog_topic=changelog,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.partitions,
        beacon=app.tables.beacon,
    )
    app.tables.add(table)
    store = TableStore(table)
    acknowledged: list[int] = []

    @app.agent(audit)
    async def follow(stream: Any) -> None:
        async for _ in stream:
            pass

    @app.timer(0.2)  # type: ignore[untyped-decorator]
    async def check() -> None:
        store.put("service:x", str(len(acknowledged)).encode(), 0)
        await table.acknowledged()
        acknowledged.append(1)

    app.in_worker = True  # what faust's Worker sets; exactly_once only applies inside a worker
    await app.start()
    try:
        await eventually(lambda: asyncio.sleep(0, len(acknowledged)), lambda count: count >= 10, timeout=60)
        assert await read_topic(settings, MONITOR_STATE) == []
    finally:
        await app.stop()

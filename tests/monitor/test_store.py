"""The monitor's table: writes name their partition, and a failed write is written again until acknowledged."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.tables.base import Collection

from services.monitor import store as store_module
from services.monitor.store import PartitionedTable, TableStore


class _Sent(asyncio.Future[Any]):
    def __init__(self, partition: int) -> None:
        super().__init__()
        self.message = SimpleNamespace(partition=partition)


async def test_a_failed_state_write_is_written_again_from_the_current_value(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, bytes, bytes | None]] = []
    failures = [RuntimeError("broker out of reach")]

    def send_changelog(self: Any, partition: int, key: bytes, value: bytes | None, *args: Any, **kwargs: Any) -> Any:
        sent.append((partition, key, value))
        future = _Sent(partition)
        if failures:
            future.set_exception(failures.pop())
        else:
            future.set_result(None)
        return future

    monkeypatch.setattr(Collection, "send_changelog", send_changelog)
    monkeypatch.setattr(store_module, "_RETRY_S", 0)
    app = faust.App("store-test", broker="kafka://127.0.0.1:1", store="memory://")
    table = PartitionedTable(app, name="state", key_type=bytes, value_type=bytes)
    app.tables.add(table)
    state = TableStore(table)
    state.put("saga:A", b"1", partition=3)
    state.put("saga:A", b"2", partition=3)
    state.put("service:x", b"up", partition=0)
    state.delete("service:x", partition=0)

    await table.acknowledged()
    assert sent[:4] == [(3, b"saga:A", b"1"), (3, b"saga:A", b"2"), (0, b"service:x", b"up"), (0, b"service:x", None)]
    # the first write failed: every key written since the last acknowledgement goes again, as it is now
    assert sorted(sent[4:], key=str) == sorted([(3, b"saga:A", b"2"), (0, b"service:x", None)], key=str)
    assert state.get("saga:A") == b"2"
    assert state.keys("s") == ["saga:A"]

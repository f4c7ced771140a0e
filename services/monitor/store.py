"""The monitor's state as a faust Table whose changelog is `monitor.state`, behind a small typed store."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from faust.tables.table import Table

# faust picks a changelog partition only from the event being processed, so a write from a timer
# could not name one; each write here names its partition explicitly instead.
_WRITE_PARTITION: contextvars.ContextVar[int | None] = contextvars.ContextVar("monitor_write_partition", default=None)


# Acknowledged writes are dropped from the list of futures to wait for once it reaches this length.
_PRUNE_AT = 1024
_RETRY_S = 1.0
log = logging.getLogger(__name__)


class StateStore(Protocol):
    """Key -> JSON bytes; every write says which partition of `monitor.state` holds the key."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes, partition: int) -> None: ...

    def delete(self, key: str, partition: int) -> None: ...

    def keys(self, prefix: str) -> list[str]: ...


class PartitionedTable(Table[bytes, bytes]):
    """A faust Table whose changelog writes go to the partition the caller chose, and can be awaited.

    faust's own `producer.flush()` gives up after 0.1 s without a send and returns with records still
    in its buffer, so the monitor waits on the futures of its own writes instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unacknowledged: list[asyncio.Future[Any]] = []
        self._written: dict[bytes, int] = {}  # key -> partition, since the last acknowledgement

    def send_changelog(self, partition: int | None, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        future = super().send_changelog(partition, key, value, *args, **kwargs)
        if len(self._unacknowledged) >= _PRUNE_AT:
            self._unacknowledged = [pending for pending in self._unacknowledged if not _succeeded(pending)]
        self._unacknowledged.append(future)
        if partition is not None:
            self._written[key] = partition
        return future

    async def acknowledged(self) -> None:
        """Return once every changelog write made so far is acknowledged by the broker.

        A write that failed (the broker out of reach longer than the producer retries) is written
        again from the table's current value, until the broker takes it: the caller's offsets must
        not be committed without the state they imply.
        """
        while True:
            pending, self._unacknowledged = self._unacknowledged, []
            written, self._written = self._written, {}
            outcomes = await asyncio.gather(*pending, return_exceptions=True)
            failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
            if not failures:
                return
            log.warning("monitor state writes failed; writing them again", extra={"error": repr(failures[0])})
            await asyncio.sleep(_RETRY_S)
            for key, partition in written.items():
                value = self.data.get(key)
                if value is None:
                    self.send_changelog(partition, key, None, value_serializer="raw")
                else:
                    self.send_changelog(partition, key, value)

    def partition_for_key(self, key: Any) -> int:
        partition = _WRITE_PARTITION.get()
        if partition is None:
            raise RuntimeError("write the monitor's table through TableStore, which names the partition")
        return partition


def _succeeded(future: asyncio.Future[Any]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


@contextmanager
def _partition(partition: int) -> Iterator[None]:
    token = _WRITE_PARTITION.set(partition)
    try:
        yield
    finally:
        _WRITE_PARTITION.reset(token)


class TableStore:
    """StateStore over a PartitionedTable: a put is one record on `monitor.state`, a delete one tombstone."""

    def __init__(self, table: PartitionedTable) -> None:
        self.table = table

    def get(self, key: str) -> bytes | None:
        value = self.table.get(key.encode())
        return value if isinstance(value, bytes) else None

    def put(self, key: str, value: bytes, partition: int) -> None:
        with _partition(partition):
            self.table[key.encode()] = value

    def delete(self, key: str, partition: int) -> None:
        raw = key.encode()
        if raw in self.table:
            with _partition(partition):
                del self.table[raw]

    def keys(self, prefix: str) -> list[str]:
        wanted = prefix.encode()
        return [key.decode() for key in list(self.table.keys()) if key.startswith(wanted)]


class MemoryStore:
    """StateStore in a dict, recording every write: for tests and tools that need no broker."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.writes: list[tuple[str, bytes | None, int]] = []

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes, partition: int) -> None:
        self.data[key] = value
        self.writes.append((key, value, partition))

    def delete(self, key: str, partition: int) -> None:
        if self.data.pop(key, None) is not None:
            self.writes.append((key, None, partition))

    def keys(self, prefix: str) -> list[str]:
        return [key for key in self.data if key.startswith(prefix)]

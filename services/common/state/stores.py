"""Where a service's task stores live: on disk under the state folder, or in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from services.common.state.backend import Checkpoint
from services.common.state.keyed import KeyedStore
from services.common.state.rocks import RocksBackend, RocksMemory, open_rocks, wipe


class StoreFactory(Protocol):
    def open(self, partition: int) -> KeyedStore: ...

    def reset(self, partition: int, store: KeyedStore) -> KeyedStore:
        """`store` closed and replaced by an empty one, for a full restore."""
        ...

    def close(self, partition: int, store: KeyedStore) -> None: ...

    @property
    def rocks_memory(self) -> RocksMemory | None:
        """The memory budget the stores share, if they are RocksDB stores."""
        ...


class MemoryStores:
    """A fresh in-memory store per assignment: every restore is a full one."""

    def open(self, partition: int) -> KeyedStore:
        return KeyedStore()

    def reset(self, partition: int, store: KeyedStore) -> KeyedStore:
        return KeyedStore()

    def close(self, partition: int, store: KeyedStore) -> None:
        store.close()

    @property
    def rocks_memory(self) -> RocksMemory | None:
        return None


class DiskStores:
    """One RocksDB per task at `<root>/<partition>`, kept across restarts so a restore is incremental.

    When another process on this machine still holds a task's folder (a second instance sharing the
    state folder, or a stalled one), the task restores into a scratch folder of this process instead,
    deleted when the task is released. All of them share one memory budget.
    """

    def __init__(self, root: Path, incarnation: str, memory: RocksMemory | None = None) -> None:
        self.root = root
        self.incarnation = incarnation
        self.memory = memory if memory is not None else RocksMemory()

    @property
    def rocks_memory(self) -> RocksMemory | None:
        return self.memory

    def open(self, partition: int) -> KeyedStore:
        return KeyedStore(open_rocks(self._path(partition), self._scratch(partition), self.memory))

    def reset(self, partition: int, store: KeyedStore) -> KeyedStore:
        backend = store.backend
        path = backend.path if isinstance(backend, RocksBackend) else self._path(partition)
        store.close()
        wipe(path)
        return KeyedStore(open_rocks(path, self._scratch(partition), self.memory))

    def close(self, partition: int, store: KeyedStore) -> None:
        store.close()
        wipe(self._scratch(partition))

    def _path(self, partition: int) -> Path:
        return self.root / str(partition)

    def _scratch(self, partition: int) -> Path:
        return self.root / f"{partition}.scratch-{self.incarnation}"


def store_factory(kind: str, root: Path, incarnation: str, memory_bytes: int) -> StoreFactory:
    return DiskStores(root, incarnation, RocksMemory(memory_bytes)) if kind == "disk" else MemoryStores()


def restore_start(
    checkpoint: Checkpoint | None, *, beginning: int, end: int, now_ms: int, delete_retention_ms: int
) -> tuple[int | None, str]:
    """Where a restore may start reading the changelog, or None for a full restore, and why.

    A checkpoint older than the changelog's delete.retention.ms is unsafe: tombstones written since
    may already be compacted away, and the keys they deleted would come back (KIP-1259).
    """
    if checkpoint is None:
        return None, "no checkpoint"
    if checkpoint.offset > end:
        return None, f"checkpoint {checkpoint.offset} is past the changelog's end {end} (topic recreated?)"
    if checkpoint.offset < beginning:
        return None, f"checkpoint {checkpoint.offset} is before the changelog's start {beginning}"
    age_ms = now_ms - checkpoint.written_at_ms
    if age_ms > delete_retention_ms:
        return None, f"checkpoint is {age_ms / 1000:.0f} s old, past delete.retention.ms ({delete_retention_ms} ms)"
    return checkpoint.offset, "checkpoint"

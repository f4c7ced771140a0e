"""The task store on both backends: transactions, checkpoints, the expiry index, and unsafe stores."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from pydantic import BaseModel

from services.common.state import Checkpoint, KeyedStore, MemoryBackend
from services.common.state.backend import Backend
from services.common.state.rocks import RocksBackend, RocksMemory
from services.common.state.stores import DiskStores, restore_start

DAY_MS = 86_400_000


class Doc(BaseModel):
    n: int


@pytest.fixture(params=["memory", "rocksdb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    opened: Backend = MemoryBackend() if request.param == "memory" else RocksBackend(tmp_path / "store", RocksMemory())
    yield opened
    if isinstance(opened, RocksBackend):
        opened.close()


class CountingBackend:
    """Counts the pairs a scan yields, to show a sweep reads only what has expired."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.scanned = 0

    def get(self, key: bytes) -> bytes | None:
        return self.inner.get(key)

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        for pair in self.inner.scan(start, stop):
            self.scanned += 1
            yield pair

    def write(self, changes: Mapping[bytes, bytes | None], checkpoint: Checkpoint | None) -> None:
        self.inner.write(changes, checkpoint)

    def checkpoint(self) -> Checkpoint | None:
        return self.inner.checkpoint()

    def close(self) -> None:
        self.inner.close()


def test_changes_reach_the_backend_only_when_their_transaction_commits(backend: Backend) -> None:
    store = KeyedStore(backend)
    store.put("order:a", Doc(n=1))
    assert store.get("order:a", Doc) == Doc(n=1)
    assert KeyedStore(backend).get("order:a", Doc) is None  # nothing written yet

    store.commit(Checkpoint(7, 1000))

    assert KeyedStore(backend).get("order:a", Doc) == Doc(n=1)
    assert backend.checkpoint() == Checkpoint(7, 1000)


def test_a_rollback_forgets_the_open_transaction_and_keeps_what_was_committed(backend: Backend) -> None:
    store = KeyedStore(backend)
    store.put("order:a", Doc(n=1))
    store.commit(Checkpoint(1, 0))
    store.put("order:a", Doc(n=2))
    store.put("order:b", Doc(n=3))
    store.delete("order:a")

    store.rollback()

    assert store.get("order:a", Doc) == Doc(n=1)
    assert store.get("order:b", Doc) is None
    assert store.keys() == ["order:a"]
    assert backend.checkpoint() == Checkpoint(1, 0)


def test_a_crash_inside_a_transaction_leaves_nothing_of_it_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = KeyedStore(RocksBackend(path, RocksMemory()))
    store.put("order:a", Doc(n=1))
    store.commit(Checkpoint(5, 0))
    store.put("order:a", Doc(n=99))
    store.put("order:b", Doc(n=99))
    store.backend.close()  # the process dies with the transaction open: only the backend survives

    reopened = KeyedStore(RocksBackend(path, RocksMemory()))
    assert reopened.get("order:a", Doc) == Doc(n=1)
    assert reopened.get("order:b", Doc) is None
    assert reopened.backend.checkpoint() == Checkpoint(5, 0)
    reopened.close()


def test_due_lists_expired_keys_in_expiry_order_reading_only_those(backend: Backend) -> None:
    counting = CountingBackend(backend)
    store = KeyedStore(counting)
    for index in range(100):
        store.put(f"order:{index:03}", Doc(n=index), expires_at=1000 + index)
    store.put("sku:x", Doc(n=0))  # never expires
    store.commit()

    counting.scanned = 0
    assert store.due(1002, limit=10) == ["order:000", "order:001", "order:002"]
    assert counting.scanned == 3
    assert store.due(5000, limit=4) == ["order:000", "order:001", "order:002", "order:003"]
    assert "sku:x" not in store.due(10**12, limit=1000)


def test_a_new_expiry_moves_the_key_in_the_index_and_keep_leaves_it(backend: Backend) -> None:
    store = KeyedStore(backend)
    store.put("order:a", Doc(n=1), expires_at=1000)
    store.commit()
    store.put("order:a", Doc(n=2))  # KEEP
    store.commit()
    assert store.expires_at("order:a") == 1000
    store.put("order:a", Doc(n=3), expires_at=5000)
    store.commit()

    assert store.due(4999, limit=10) == []
    assert store.due(5000, limit=10) == ["order:a"]
    store.put("order:a", Doc(n=4), expires_at=None)
    store.commit()
    assert store.due(10**12, limit=10) == []


def test_a_deleted_key_leaves_the_index(backend: Backend) -> None:
    store = KeyedStore(backend)
    store.put("order:a", Doc(n=1), expires_at=1000)
    store.commit()
    store.delete("order:a")
    store.commit()
    assert store.due(10**12, limit=10) == []
    assert list(backend.scan(b"", b"\xff")) == []


def test_restoring_changelog_records_rebuilds_the_values_and_the_expiry_index(backend: Backend) -> None:
    source = KeyedStore()
    source.put("order:a", Doc(n=1), expires_at=2000)
    source.put("order:b", Doc(n=2), expires_at=1000)
    source.put("sku:x", Doc(n=3))
    records = source.pending_records()

    restored = KeyedStore(backend)
    restored.restore_batch(records, Checkpoint(3, 0))

    assert restored.keys() == ["order:a", "order:b", "sku:x"]
    assert restored.due(1500, limit=10) == ["order:b"]
    assert backend.checkpoint() == Checkpoint(3, 0)


def test_an_uncommitted_expiry_is_swept_only_after_commit(backend: Backend) -> None:
    store = KeyedStore(backend)
    store.put("order:a", Doc(n=1), expires_at=1000)
    assert store.due(2000, limit=10) == []
    store.commit()
    assert store.due(2000, limit=10) == ["order:a"]


def test_decoded_documents_are_cached_within_a_bound(backend: Backend) -> None:
    store = KeyedStore(backend, cache_entries=10)
    for index in range(50):
        store.put(f"k{index}", Doc(n=index))
    store.commit()
    assert all(store.get(f"k{index}", Doc) == Doc(n=index) for index in range(50))
    assert len(store._decoded) == 10


@pytest.mark.parametrize(
    ("checkpoint", "start"),
    [
        (None, None),
        (Checkpoint(50, 10 * DAY_MS), 50),
        (Checkpoint(0, 10 * DAY_MS), None),  # before the log start
        (Checkpoint(200, 10 * DAY_MS), None),  # past the end: the topic was recreated
        (Checkpoint(50, 10 * DAY_MS - DAY_MS - 1), None),  # older than delete.retention.ms
        (Checkpoint(100, 10 * DAY_MS - DAY_MS), 100),
    ],
)
def test_a_restore_starts_at_a_usable_checkpoint_and_is_full_otherwise(
    checkpoint: Checkpoint | None, start: int | None
) -> None:
    found, why = restore_start(checkpoint, beginning=10, end=100, now_ms=10 * DAY_MS, delete_retention_ms=DAY_MS)
    assert found == start
    assert why


def test_a_store_held_by_another_process_is_replaced_by_a_scratch_store(tmp_path: Path) -> None:
    first, second = DiskStores(tmp_path, "one"), DiskStores(tmp_path, "two")
    held = first.open(0)
    held.put("order:a", Doc(n=1))
    held.commit(Checkpoint(1, 0))

    scratch = second.open(0)
    assert scratch.get("order:a", Doc) is None
    assert isinstance(scratch.backend, RocksBackend)
    assert scratch.backend.path == tmp_path / "0.scratch-two"
    second.close(0, scratch)
    assert not (tmp_path / "0.scratch-two").exists()
    first.close(0, held)

    reopened = second.open(0)
    assert reopened.get("order:a", Doc) == Doc(n=1)
    second.close(0, reopened)


def test_a_corrupt_store_is_wiped_and_opened_empty(tmp_path: Path) -> None:
    stores = DiskStores(tmp_path, "one")
    store = stores.open(3)
    store.put("order:a", Doc(n=1))
    store.commit(Checkpoint(1, 0))
    stores.close(3, store)
    for name in os.listdir(tmp_path / "3" / "db"):
        if name.startswith(("MANIFEST", "CURRENT")):
            (tmp_path / "3" / "db" / name).write_bytes(b"garbage")

    reopened = stores.open(3)
    assert reopened.get("order:a", Doc) is None
    assert reopened.backend.checkpoint() is None
    stores.close(3, reopened)


class Padded(BaseModel):
    n: int
    padding: str


def test_rocksdb_memory_of_all_stores_fills_one_capped_cache(tmp_path: Path) -> None:
    # Given two task stores sharing a 4 MiB budget, when they take and read back far more than that
    memory = RocksMemory(4 * 1024 * 1024)
    stores = [KeyedStore(RocksBackend(tmp_path / str(task), memory)) for task in (0, 1)]
    for store in stores:
        for batch in range(10):
            for number in range(batch * 1000, (batch + 1) * 1000):
                store.put(f"order:{number}", Padded(n=number, padding="x" * 500))
            store.commit()
    read_back = [store.get(f"order:{number}", Padded) for store in stores for number in range(0, 10_000, 7)]
    # Then what RocksDB holds, memtables and read blocks, fills the shared cache up to its cap and no further
    used = memory.in_use()
    for store in stores:
        store.close()
    assert all(found is not None for found in read_back)
    # Entries in use (memtables being flushed, pinned L0 index and filter blocks) may take a
    # non-strict LRU cache a little past its capacity until they are released.
    assert memory.limit_bytes / 2 < used <= memory.limit_bytes * 1.15


def test_a_reopened_store_still_reads_through_the_shared_cache(tmp_path: Path) -> None:
    # Given a store written and closed by an earlier process
    store = KeyedStore(RocksBackend(tmp_path / "0", RocksMemory()))
    for number in range(5000):
        store.put(f"order:{number}", Padded(n=number, padding="x" * 500))
    store.commit()
    store.close()
    # When a new process opens it and reads it back
    memory = RocksMemory(4 * 1024 * 1024)
    reopened = KeyedStore(RocksBackend(tmp_path / "0", memory))
    found = [reopened.get(f"order:{number}", Padded) for number in range(0, 5000, 3)]
    used = memory.in_use()
    reopened.close()
    # Then the blocks it read are in the budget it was given, not in a cache of RocksDB's defaults
    assert all(doc is not None for doc in found)
    assert used > 1024 * 1024

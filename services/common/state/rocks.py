"""The disk backend: one RocksDB (through rocksdict) per task, its memory capped.

Writes skip RocksDB's write-ahead log: the changelog is the backup, and a batch carries its own
checkpoint, so a crash loses at most the latest batches and the restart replays them from the
changelog (as Kafka Streams does). All of a process's RocksDB memory stays within one cache, as
Kafka Streams' bounded-memory recipe does: the block cache, the memtables (charged to it by a
write buffer manager) and the index and filter blocks of every table file.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteBufferManager, WriteOptions

from services.common.settings import DEFAULT_STATE_MEMORY_BYTES
from services.common.state.backend import CHECKPOINT_KEY, Checkpoint

log = logging.getLogger(__name__)

# Of the memory budget, the share the memtables of all stores may take before the largest is flushed.
MEMTABLE_SHARE = 4
WRITE_BUFFER_BYTES = 2 * 1024 * 1024
BLOOM_BITS_PER_KEY = 10  # about 1% false positives
LOCK_FILE = "choreo.lock"


class RocksMemory:
    """Everything RocksDB keeps in memory for the stores sharing it: one LRU cache of `limit_bytes`
    holding the data, index and filter blocks, with the memtables charged to it.

    A cache fills to its limit and stays there: blocks of table files that compaction has replaced
    leave it only as newer blocks push them out.
    """

    def __init__(self, limit_bytes: int = DEFAULT_STATE_MEMORY_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self._cache = Cache(limit_bytes)
        self._write_buffers = WriteBufferManager.new_write_buffer_manager_with_cache(
            limit_bytes // MEMTABLE_SHARE, False, self._cache
        )

    def in_use(self) -> int:
        """Bytes held in the cache, memtables included."""
        usage: int = self._cache.get_usage()
        return usage

    def options(self) -> Options:
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        table = BlockBasedOptions()
        table.set_block_cache(self._cache)
        # Most reads look up an order no table file holds yet; the filter answers them without a block read.
        table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)
        # Index and filter blocks would otherwise stay in memory outside the cache, one set per table file.
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        options.set_block_based_table_factory(table)
        options.set_write_buffer_manager(self._write_buffers)
        options.set_write_buffer_size(min(WRITE_BUFFER_BYTES, self.limit_bytes // MEMTABLE_SHARE // 2))
        options.set_max_write_buffer_number(2)
        options.set_max_open_files(64)
        return options


class StoreLockedError(RuntimeError):
    """Another live process holds this task's store folder."""


class RocksBackend:
    def __init__(self, path: Path, memory: RocksMemory) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        # Our own lock, taken before RocksDB's: it tells a folder in use by another process (a
        # second instance on this machine, or a stalled one) from a store that cannot be opened.
        self._lock = open(path / LOCK_FILE, "a+b")  # noqa: SIM115 (held for the store's lifetime)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            self._lock.close()
            raise StoreLockedError(f"{path} is in use by another process") from error
        try:
            # Options apply only to column families rocksdict creates: a store reopened without naming
            # its default family would run on RocksDB's defaults, with a block cache of its own
            # outside the budget and no bloom filter (quixstreams #1136).
            options = memory.options()
            self._db = Rdict(str(path / "db"), options, column_families={"default": options})
        except Exception:
            self._release_lock()
            raise
        self._write_options = WriteOptions()
        # rocksdict's stub declares a method; at run time it is a property.
        self._write_options.disable_wal = True  # type: ignore[method-assign,assignment]

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        return value

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        iterator = self._db.iter()
        iterator.seek(start)
        while iterator.valid():
            key: bytes = iterator.key()
            if key >= stop:
                break
            yield key, iterator.value()
            iterator.next()

    def write(self, changes: Mapping[bytes, bytes | None], checkpoint: Checkpoint | None) -> None:
        batch = WriteBatch(raw_mode=True)
        for key, value in changes.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        if checkpoint is not None:
            batch.put(CHECKPOINT_KEY, checkpoint.to_bytes())
        self._db.write(batch, self._write_options)

    def checkpoint(self) -> Checkpoint | None:
        raw = self._db.get(CHECKPOINT_KEY)
        return Checkpoint.from_bytes(raw) if raw is not None else None

    def close(self) -> None:
        try:
            self._db.flush()
            self._db.close()
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()


def open_rocks(path: Path, scratch: Path, memory: RocksMemory) -> RocksBackend:
    """The task's store at `path`; a fresh one at `scratch` when another process holds `path`;
    `path` wiped and created anew when it cannot be opened (the changelog restores it)."""
    try:
        return RocksBackend(path, memory)
    except StoreLockedError:
        log.warning("task store in use by another process; restoring into a scratch store", extra={"path": str(path)})
        wipe(scratch)
        return RocksBackend(scratch, memory)
    except Exception as error:  # corrupt or unreadable: the changelog has everything
        log.warning("task store unusable; restoring it in full", extra={"path": str(path), "error": repr(error)})
        wipe(path)
        return RocksBackend(path, memory)


def wipe(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)

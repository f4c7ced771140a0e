"""A task's state as handlers see it: JSON documents by key, each with an optional expiry time.

Changes stay in an overlay until their transaction commits; `commit` then writes them to the
backend in one batch with the changelog checkpoint. Expiry times are kept in an index ordered by
time, beside the values, so finding what has expired reads only that.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any, TypeVar

import msgspec
from pydantic import BaseModel

from services.common.state.backend import Backend, Checkpoint
from services.common.state.memory import MemoryBackend

Document = BaseModel | msgspec.Struct
"""A stored value: a pydantic model, or a msgspec Struct where a hot path cannot afford pydantic's copies."""
Model = TypeVar("Model", bound=Document)

_VALUE = b"s"
_INDEX = b"x"
_TIME = struct.Struct(">Q")  # big-endian, so the index sorts by time
DECODED_CACHE_ENTRIES = 4096


class Keep(Enum):
    KEEP = "keep"


KEEP = Keep.KEEP
"""`put(..., expires_at=KEEP)`: leave the key's expiry as it is."""


@dataclass(frozen=True)
class ChangelogRecord:
    """One state change as the changelog carries it: a null value deletes the key."""

    key: str
    value: bytes | None
    expires_at_ms: int | None = None


def _pack(value: bytes, expires_at_ms: int | None) -> bytes:
    return _TIME.pack(expires_at_ms or 0) + value


def _unpack(stored: bytes) -> tuple[bytes, int | None]:
    expires_at_ms = _TIME.unpack_from(stored)[0]
    return stored[_TIME.size :], (expires_at_ms or None)


def _index_key(expires_at_ms: int, key: bytes) -> bytes:
    return _INDEX + _TIME.pack(expires_at_ms) + key


def _decode(raw: bytes, model: type[Model]) -> Model:
    if issubclass(model, msgspec.Struct):
        decoded: Model = _struct_decoder(model).decode(raw)
        return decoded
    return model.model_validate_json(raw)


def _encode(value: Document) -> bytes:
    if isinstance(value, msgspec.Struct):
        return _STRUCT_ENCODER.encode(value)
    return value.model_dump_json().encode()


@cache
def _struct_decoder(model: type[Any]) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(model)


_STRUCT_ENCODER = msgspec.json.Encoder()


class KeyedStore:
    """One task's keyed state over a backend (in memory unless given one)."""

    def __init__(self, backend: Backend | None = None, *, cache_entries: int = DECODED_CACHE_ENTRIES) -> None:
        self.backend: Backend = backend if backend is not None else MemoryBackend()
        self._dirty: dict[str, tuple[bytes | None, int | None]] = {}
        # Decoded documents (and their expiry) of recently used keys, committed or not: bounded, so
        # memory does not follow the number of keys.
        self._decoded: OrderedDict[str, tuple[Document, int | None]] = OrderedDict()
        self._cache_entries = cache_entries

    # --- reading ------------------------------------------------------------------------------

    def get(self, key: str, model: type[Model]) -> Model | None:
        cached = self._decoded.get(key)
        if cached is not None and isinstance(cached[0], model):
            self._decoded.move_to_end(key)
            return cached[0]
        raw, expires_at_ms = self._lookup(key)
        if raw is None:
            return None
        value = _decode(raw, model)
        self._cache(key, value, expires_at_ms)
        return value

    def expires_at(self, key: str) -> int | None:
        """When `key` expires (epoch ms), or None if it never does or does not exist."""
        cached = self._decoded.get(key)
        if cached is not None:
            return cached[1]
        return self._lookup(key)[1]

    def keys(self, prefix: str = "") -> list[str]:
        """Every live key starting with `prefix`, in order (a scan: for tests and small prefixes)."""
        start = _VALUE + prefix.encode()
        stored = {key[1:].decode() for key, _ in self.backend.scan(start, start + b"\xff")}
        for key, (value, _) in self._dirty.items():
            if key.startswith(prefix):
                (stored.add if value is not None else stored.discard)(key)
        return sorted(stored)

    def __len__(self) -> int:
        return len(self.keys())

    def due(self, now_ms: int, limit: int) -> list[str]:
        """Up to `limit` keys whose expiry is at or before `now_ms`, earliest first.

        Reads the committed index only: a key given an expiry in the open transaction is found by
        the first sweep after it commits, and one changed since is judged by its current expiry.
        """
        found: list[str] = []
        stop = _INDEX + _TIME.pack(now_ms + 1)
        for index_key, _ in self.backend.scan(_INDEX, stop):
            key = index_key[1 + _TIME.size :].decode()
            current = self.expires_at(key)
            if current is not None and current <= now_ms:
                found.append(key)
                if len(found) >= limit:
                    break
        return found

    # --- writing ------------------------------------------------------------------------------

    def put(self, key: str, value: Document, *, expires_at: int | Keep | None = KEEP) -> None:
        expiry = self.expires_at(key) if expires_at is KEEP else expires_at
        # Serialized here, not at the commit: a value that cannot be is a handler's error, and fails the
        # record being handled (dead-lettered) rather than every commit of the instance.
        self._dirty[key] = (_encode(value), expiry)
        self._cache(key, value, expiry)

    def delete(self, key: str) -> None:
        self._dirty[key] = (None, None)
        self._decoded.pop(key, None)

    @property
    def dirty(self) -> bool:
        """Whether the open transaction changed anything."""
        return bool(self._dirty)

    def pending_records(self) -> list[ChangelogRecord]:
        """What the open transaction changed, as changelog records."""
        return [ChangelogRecord(key, value, expiry) for key, (value, expiry) in self._dirty.items()]

    def pending_changes(self) -> dict[str, bytes | None]:
        return {key: value for key, (value, _) in self._dirty.items()}

    def commit(self, checkpoint: Checkpoint | None = None) -> None:
        """The open transaction committed: write its changes (and the checkpoint) in one batch."""
        records = self.pending_records()
        self._dirty = {}
        if records or checkpoint is not None:
            self.backend.write(self._batch(records), checkpoint)

    def rollback(self) -> None:
        """The open transaction was aborted: forget its changes."""
        for key in self._dirty:
            self._decoded.pop(key, None)
        self._dirty = {}

    def restore(self, key: str, value: bytes | None, expires_at_ms: int | None = None) -> None:
        """Apply one changelog record outside any transaction."""
        self.restore_batch([ChangelogRecord(key, value, expires_at_ms)], None)

    def restore_batch(self, records: Iterable[ChangelogRecord], checkpoint: Checkpoint | None) -> None:
        """Apply changelog records read back from the topic, with the position they reach."""
        records = list(records)
        for record in records:
            self._decoded.pop(record.key, None)
        self.backend.write(self._batch(records), checkpoint)

    def close(self) -> None:
        self._dirty = {}
        self._decoded.clear()
        self.backend.close()

    # --- internals ----------------------------------------------------------------------------

    def _lookup(self, key: str) -> tuple[bytes | None, int | None]:
        if key in self._dirty:
            return self._dirty[key]
        stored = self.backend.get(_VALUE + key.encode())
        if stored is None:
            return None, None
        return _unpack(stored)

    def _cache(self, key: str, value: Document, expires_at_ms: int | None) -> None:
        self._decoded[key] = (value, expires_at_ms)
        self._decoded.move_to_end(key)
        if len(self._decoded) > self._cache_entries:
            self._decoded.popitem(last=False)

    def _batch(self, records: Iterable[ChangelogRecord]) -> dict[bytes, bytes | None]:
        """Backend writes for `records`: values, and the index moved to each key's new expiry.

        Records are applied in order, so a key written twice in one batch ends as its last record.
        """
        batch: dict[bytes, bytes | None] = {}
        expiry: dict[bytes, int | None] = {}
        for record in records:
            key = record.key.encode()
            if key in expiry:
                previous = expiry[key]
            else:
                stored = self.backend.get(_VALUE + key)
                previous = _unpack(stored)[1] if stored is not None else None
            if previous is not None:
                batch[_index_key(previous, key)] = None
            if record.value is None:
                batch[_VALUE + key] = None
                expiry[key] = None
            else:
                batch[_VALUE + key] = _pack(record.value, record.expires_at_ms)
                expiry[key] = record.expires_at_ms
                if record.expires_at_ms is not None:
                    batch[_index_key(record.expires_at_ms, key)] = b""
        return batch

"""What a store backend must do: ordered bytes by bytes, atomic batches, and a checkpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

CHECKPOINT_KEY = b"\x00checkpoint"
"""Sorts before every state key (those start with a printable prefix byte)."""


@dataclass(frozen=True)
class Checkpoint:
    """The changelog position a backend's contents correspond to, and when that was written."""

    offset: int
    written_at_ms: int

    def to_bytes(self) -> bytes:
        return json.dumps({"offset": self.offset, "written_at_ms": self.written_at_ms}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Checkpoint:
        document = json.loads(raw)
        return cls(offset=int(document["offset"]), written_at_ms=int(document["written_at_ms"]))


class Backend(Protocol):
    """An ordered key-value store; `write` applies a batch (None deletes) and the checkpoint atomically."""

    def get(self, key: bytes) -> bytes | None: ...

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Pairs with start <= key < stop, in key order."""
        ...

    def write(self, changes: Mapping[bytes, bytes | None], checkpoint: Checkpoint | None) -> None: ...

    def checkpoint(self) -> Checkpoint | None: ...

    def close(self) -> None: ...

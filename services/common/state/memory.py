"""The in-memory backend: for unit tests, and for `CHOREO_STATE_STORE=memory`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from sortedcontainers import SortedDict

from services.common.state.backend import CHECKPOINT_KEY, Checkpoint


class MemoryBackend:
    """Ordered like the disk backend, so a sweep over the expiry index never scans the whole store."""

    def __init__(self) -> None:
        self._data: SortedDict = SortedDict()

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._data.get(key)
        return value

    def scan(self, start: bytes, stop: bytes) -> Iterator[tuple[bytes, bytes]]:
        for key in list(self._data.irange(start, stop, inclusive=(True, False))):
            yield key, self._data[key]

    def write(self, changes: Mapping[bytes, bytes | None], checkpoint: Checkpoint | None) -> None:
        for key, value in changes.items():
            if value is None:
                self._data.pop(key, None)
            else:
                self._data[key] = value
        if checkpoint is not None:
            self._data[CHECKPOINT_KEY] = checkpoint.to_bytes()

    def checkpoint(self) -> Checkpoint | None:
        raw = self._data.get(CHECKPOINT_KEY)
        return Checkpoint.from_bytes(raw) if raw is not None else None

    def close(self) -> None:
        """Nothing to release: the contents go with the object."""

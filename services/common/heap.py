"""Handing memory the process has freed back to the system.

glibc's malloc returns memory to the system only from the top of its heap. A long-running service
frees memory in the middle of it all the time (the RocksDB block cache evicts and loads blocks
between Python's own allocations), so without help its RSS creeps up by the free pages it keeps.
`malloc_trim(0)` releases every whole free page, wherever it is in the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

TRIM_INTERVAL_S = 60.0


def glibc_malloc_trim() -> Callable[[], bool] | None:
    """`malloc_trim(0)` of the C library, when it is glibc; None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: bool(trim(0))


class HeapTrimmer:
    """Trims the heap at most every `interval_s`; `trim_if_due` is cheap when it is not due."""

    def __init__(
        self,
        trim: Callable[[], bool] | None,
        interval_s: float = TRIM_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._trim = trim
        self.interval_s = interval_s
        self._clock = clock
        self._last = clock()
        self.trims = 0
        self.seconds = 0.0

    def trim_if_due(self) -> bool:
        """Trim now if the interval has passed; True if memory went back to the system."""
        if self._trim is None or self._clock() - self._last < self.interval_s:
            return False
        started = time.perf_counter()
        released = self._trim()
        self.seconds += time.perf_counter() - started
        self.trims += 1
        self._last = self._clock()
        return released

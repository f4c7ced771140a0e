"""Handing freed memory back: the trim's pace, and glibc's malloc_trim found and callable."""

from __future__ import annotations

import sys

import pytest

from services.common.heap import HeapTrimmer, glibc_malloc_trim


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_heap_is_trimmed_at_most_once_per_interval() -> None:
    clock, calls = Clock(), list[float]()

    def trim() -> bool:
        calls.append(clock.now)
        return True

    trimmer = HeapTrimmer(trim, interval_s=60, clock=clock)

    for now in (0.0, 30.0, 59.9, 60.0, 61.0, 119.0, 125.0):
        clock.now = now
        trimmer.trim_if_due()

    assert calls == [60.0, 125.0]
    assert trimmer.trims == 2


def test_without_glibc_nothing_is_trimmed() -> None:
    trimmer = HeapTrimmer(None, interval_s=0)
    assert trimmer.trim_if_due() is False
    assert trimmer.trims == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc is the C library on the Linux we run")
def test_glibc_malloc_trim_gives_back_pages_freed_in_the_middle_of_the_heap() -> None:
    trim = glibc_malloc_trim()
    assert trim is not None
    trim()
    # Below the mmap threshold, so on the heap; every other one freed leaves whole free pages in its middle.
    garbage = [bytearray(64 * 1024) for _ in range(500)]
    del garbage[::2]
    assert trim() is True
    del garbage

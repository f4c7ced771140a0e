"""The collector as a service sets it after start-up: what existed is frozen, the youngest generation collected
less often, and cycles made later still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from services.common.garbage import PYTHON_YOUNG_THRESHOLD, tune_collector
from services.common.settings import ChoreoSettings


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector_restored")
def test_start_up_objects_are_frozen_and_later_cycles_still_collected() -> None:
    # Given an object made during start-up, and the default settings
    made_at_start = Node()
    young_threshold = ChoreoSettings().gc_young_threshold
    _, middle, oldest = gc.get_threshold()
    # When the collector is tuned
    tune_collector(young_threshold)
    # Then what existed is out of every generation the collector walks
    assert gc.get_freeze_count() > 0
    assert not any(tracked is made_at_start for tracked in gc.get_objects())
    # And the youngest generation waits for the setting's count of allocations, the others keep Python's
    assert gc.get_threshold() == (young_threshold, middle, oldest)
    assert young_threshold > PYTHON_YOUNG_THRESHOLD
    # And a cycle made later is still found and freed
    first, second = Node(), Node()
    first.other, second.other = second, first
    gone = weakref.ref(first)
    del first, second
    gc.collect()
    assert gone() is None


def test_a_threshold_below_100_is_refused() -> None:
    with pytest.raises(ValueError, match="gc_young_threshold"):
        ChoreoSettings(gc_young_threshold=10)

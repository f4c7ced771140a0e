"""Python's cyclic garbage collector, set for a long-running service.

With Python's defaults the youngest generation is collected every 700 net allocations of container
objects, and all three generations together whenever the survivors have grown by a quarter. A
service keeps thousands of decoded states and records in flight alive, so under load each one ran a
full collection every few seconds, each pausing its event loop (and every record waiting in it) for
60-400 ms, and its collections added up to 6-20% of its CPU time. Two changes, made once start-up
is done:

- what start-up made (modules, classes, the app and its catalogs) lives as long as the process and
  is never garbage, so it is moved out of the collector's reach (`gc.freeze`), and no collection
  walks it again;
- the youngest generation is collected every `young_threshold` allocations instead of 700, so the
  objects that live for a while (records waiting for their commit, a batch's decoded events) are
  mostly freed by their reference counts before a collection finds them alive, and fewer of them
  are promoted into the older generations that full collections walk.

Cycles are still collected, only found later: after up to `young_threshold` allocations instead of 700.
"""

from __future__ import annotations

import gc

PYTHON_YOUNG_THRESHOLD = 700


def tune_collector(young_threshold: int) -> None:
    """Freeze what exists now and collect the youngest generation every `young_threshold` allocations."""
    gc.collect()  # so that garbage of start-up is freed rather than frozen
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, oldest)

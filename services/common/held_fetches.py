"""Fetches the broker holds until the next commit may begin: one fetch per commit instead of one per arrival.

A runner commits what it handled at most once per commit interval, so a record that arrives before the
interval is up waits for it whatever happens. Yet a fetch that returns at the first record
(fetch.min.bytes 1) costs a fetch request and its answer, on the broker and in Python, for each arrival.
So a fetch sent before the interval is up asks for as many bytes as a fetch may bring and a wait that ends
just before then: the broker answers once, with everything that arrived by then (or at once, when a whole
fetch's worth is there, as when a service catches up). A fetch sent after it returns at the first record as
before, so a record after a quiet spell is never held back.

Inputs a service mostly skips (shipping reads every order placed, for the rare cancellation) would end
each of those unheld fetches with a record that changes nothing, one fetch per arrival again. So an
unheld fetch leaves them out, and waits no longer than until their turn: they are fetched once per
interval, and every held fetch brings them too.

aiokafka builds each fetch request from its fetcher's `_fetch_min_bytes` and `_fetch_max_wait_ms`, read when
the request is made, and from the assignment it is given; those are set here just before, from the
deadline as it is then.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

# The held fetch is answered this long before the commit is due, so its records make that commit.
MARGIN_MS = 2
# A hold shorter than this is not worth a request of its own: the fetch returns at the first record.
SHORTEST_HOLD_MS = 3

Deadline = Callable[[], float | None]
"""The soonest (time.monotonic) records fetched now can be committed; None: at once."""


@dataclass(frozen=True)
class FetchLimits:
    """How one fetch request is made."""

    min_bytes: int
    max_wait_ms: int
    mostly_skipped: bool = True
    """Whether the fetch includes the inputs the service mostly skips."""


def hold_fetches(
    fetcher: Any, deadline: Deadline, *, mostly_skipped: Collection[str] = (), skipped_every_s: float = 0.0
) -> None:
    """Make every fetch `fetcher` sends from now on wait at the broker until just before `deadline()`, and
    fetch the topics `mostly_skipped` no more often than every `skipped_every_s` when it does not wait."""
    make_requests = fetcher._get_actions_per_node
    min_bytes, max_wait_ms, max_bytes = fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms, fetcher._fetch_max_bytes
    skipped_due = -math.inf

    def requests_held_until_deadline(assignment: Any) -> Any:
        nonlocal skipped_due
        now = time.monotonic()
        limits = fetch_limits(deadline(), now, min_bytes, max_wait_ms, max_bytes, skipped_due=skipped_due)
        fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = limits.min_bytes, limits.max_wait_ms
        if limits.mostly_skipped:
            if mostly_skipped:
                skipped_due = now + skipped_every_s
            return make_requests(assignment)
        return make_requests(_Without(assignment, mostly_skipped))

    fetcher._get_actions_per_node = requests_held_until_deadline


def fetch_limits(
    due: float | None,
    now: float,
    min_bytes: int,
    max_wait_ms: int,
    max_bytes: int,
    *,
    skipped_due: float = -math.inf,
) -> FetchLimits:
    """The fetch sent at `now` whose records are committed at `due`; the inputs mostly skipped are next due
    at `skipped_due`.

    Held, it asks for as many bytes as a fetch may bring (`max_bytes`), which only a backlog fills.
    """
    hold_ms = (due - now) * 1000 - MARGIN_MS if due is not None else -math.inf
    if hold_ms >= SHORTEST_HOLD_MS:  # never before the first commit, when `due` is -inf
        return FetchLimits(max(min_bytes, max_bytes), min(int(hold_ms), max_wait_ms))
    if skipped_due <= now:
        return FetchLimits(min_bytes, max_wait_ms)
    until_skipped_ms = math.ceil((skipped_due - now) * 1000)
    return FetchLimits(min_bytes, min(until_skipped_ms, max_wait_ms), mostly_skipped=False)


class _Without:
    """An aiokafka assignment without the partitions of some topics, as the fetcher reads one; when nothing
    else is assigned, all of it, so that a fetch is still made."""

    def __init__(self, assignment: Any, topics: Collection[str]) -> None:
        self._assignment = assignment
        kept = [tp for tp in assignment.tps if tp.topic not in topics]
        self.tps = kept or list(assignment.tps)

    def state_value(self, tp: Any) -> Any:
        return self._assignment.state_value(tp)

"""Fetches the broker holds until the next commit may begin: one fetch per commit instead of one per arrival.

A runner commits what it handled at most once per commit interval, so a record that arrives before the
interval is up waits for it whatever happens. Yet a fetch that returns at the first record
(fetch.min.bytes 1) costs a fetch request and its answer, on the broker and in Python, for each arrival.
So a fetch sent before the interval is up asks for as many bytes as a fetch may bring and a wait that ends
just before then: the broker answers once, with everything that arrived by then (or at once, when a whole
fetch's worth is there, as when a service catches up). A fetch sent after it returns at the first record as
before, so a record after a quiet spell is never held back.

aiokafka builds each fetch request from its fetcher's `_fetch_min_bytes` and `_fetch_max_wait_ms`, read when
the request is made; those are set here just before, from the deadline as it is then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# The held fetch is answered this long before the commit is due, so its records make that commit.
MARGIN_MS = 2
# A hold shorter than this is not worth a request of its own: the fetch returns at the first record.
SHORTEST_HOLD_MS = 3

Deadline = Callable[[], float | None]
"""The soonest (time.monotonic) records fetched now can be committed; None: at once."""


def hold_fetches(fetcher: Any, deadline: Deadline) -> None:
    """Make every fetch `fetcher` sends from now on wait at the broker until just before `deadline()`."""
    make_requests = fetcher._get_actions_per_node
    min_bytes, max_wait_ms, max_bytes = fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms, fetcher._fetch_max_bytes

    def requests_held_until_deadline(assignment: Any) -> Any:
        fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = fetch_limits(
            deadline(), time.monotonic(), min_bytes, max_wait_ms, max_bytes
        )
        return make_requests(assignment)

    fetcher._get_actions_per_node = requests_held_until_deadline


def fetch_limits(due: float | None, now: float, min_bytes: int, max_wait_ms: int, max_bytes: int) -> tuple[int, int]:
    """(fetch.min.bytes, fetch.max.wait.ms) for a fetch sent at `now` whose records are committed at `due`.

    Held, it asks for as many bytes as a fetch may bring (`max_bytes`), which only a backlog fills.
    """
    if due is None:
        return min_bytes, max_wait_ms
    hold_ms = (due - now) * 1000 - MARGIN_MS
    if hold_ms < SHORTEST_HOLD_MS:  # also before any commit, when `due` is -inf
        return min_bytes, max_wait_ms
    return max(min_bytes, max_bytes), min(int(hold_ms), max_wait_ms)

"""How long the broker holds a fetch while a commit is due (the mechanism is tested on the broker in
tests/test_processor.py)."""

from __future__ import annotations

import math

from services.common.held_fetches import MARGIN_MS, SHORTEST_HOLD_MS, fetch_limits

MIN_BYTES, MAX_WAIT_MS, MAX_BYTES = 1, 100, 50 * 1024 * 1024


def test_with_no_commit_due_a_fetch_returns_at_the_first_record() -> None:
    assert fetch_limits(None, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES) == (MIN_BYTES, MAX_WAIT_MS)


def test_a_fetch_is_held_until_just_before_the_commit() -> None:
    assert fetch_limits(10.025, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES) == (MAX_BYTES, 25 - MARGIN_MS)


def test_a_hold_never_exceeds_the_fetch_wait() -> None:
    assert fetch_limits(11.0, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES) == (MAX_BYTES, MAX_WAIT_MS)


def test_a_commit_too_close_or_past_leaves_the_fetch_as_it_was() -> None:
    almost_due = 10.0 + (MARGIN_MS + SHORTEST_HOLD_MS - 1) / 1000
    assert fetch_limits(almost_due, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES) == (MIN_BYTES, MAX_WAIT_MS)
    assert fetch_limits(9.0, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES) == (MIN_BYTES, MAX_WAIT_MS)


def test_before_the_first_commit_a_fetch_returns_at_the_first_record() -> None:
    assert fetch_limits(-math.inf, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES) == (MIN_BYTES, MAX_WAIT_MS)

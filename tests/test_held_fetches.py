"""How long the broker holds a fetch while a commit is due, and when the inputs mostly skipped are fetched
(the mechanism is tested on the broker in tests/test_processor.py)."""

from __future__ import annotations

import math

from services.common.held_fetches import MARGIN_MS, SHORTEST_HOLD_MS, FetchLimits, fetch_limits

MIN_BYTES, MAX_WAIT_MS, MAX_BYTES = 1, 100, 50 * 1024 * 1024
AT_FIRST_RECORD = FetchLimits(MIN_BYTES, MAX_WAIT_MS)


def test_with_no_commit_due_a_fetch_returns_at_the_first_record() -> None:
    assert fetch_limits(None, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES) == AT_FIRST_RECORD


def test_a_fetch_is_held_until_just_before_the_commit() -> None:
    assert fetch_limits(10.025, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES) == FetchLimits(MAX_BYTES, 25 - MARGIN_MS)


def test_a_hold_never_exceeds_the_fetch_wait() -> None:
    assert fetch_limits(11.0, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES) == FetchLimits(MAX_BYTES, MAX_WAIT_MS)


def test_a_commit_too_close_or_past_leaves_the_fetch_as_it_was() -> None:
    almost_due = 10.0 + (MARGIN_MS + SHORTEST_HOLD_MS - 1) / 1000
    assert fetch_limits(almost_due, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES) == AT_FIRST_RECORD
    assert fetch_limits(9.0, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES) == AT_FIRST_RECORD


def test_before_the_first_commit_a_fetch_returns_at_the_first_record() -> None:
    assert fetch_limits(-math.inf, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES) == AT_FIRST_RECORD


def test_a_fetch_not_held_leaves_the_inputs_mostly_skipped_out_until_their_turn() -> None:
    limits = fetch_limits(9.0, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES, skipped_due=10.0125)
    assert limits == FetchLimits(MIN_BYTES, 13, mostly_skipped=False)


def test_the_inputs_mostly_skipped_are_fetched_when_their_turn_has_come() -> None:
    assert fetch_limits(9.0, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES, skipped_due=10.0) == AT_FIRST_RECORD


def test_a_held_fetch_always_brings_the_inputs_mostly_skipped() -> None:
    limits = fetch_limits(10.025, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES, skipped_due=10.02)
    assert limits == FetchLimits(MAX_BYTES, 25 - MARGIN_MS)


def test_waiting_for_their_turn_never_exceeds_the_fetch_wait() -> None:
    limits = fetch_limits(None, 10.0, MIN_BYTES, MAX_WAIT_MS, MAX_BYTES, skipped_due=11.0)
    assert limits == FetchLimits(MIN_BYTES, MAX_WAIT_MS, mostly_skipped=False)

"""The commit cadence's rules, with times given rather than read from a clock."""

from __future__ import annotations

import math

from services.common.cadence import OFFSETS_ONLY_INTERVAL_S, CommitCadence


def test_the_first_transaction_is_due_at_once() -> None:
    cadence = CommitCadence(interval_s=0.05)
    assert cadence.due(effects=True) == -math.inf
    assert cadence.fetch_deadline() == -math.inf


def test_the_next_transaction_is_due_an_interval_after_the_last_one_began_not_after_it_ended() -> None:
    cadence = CommitCadence(interval_s=0.05)
    cadence.began(10.0)
    cadence.ended(10.02)
    assert cadence.due(effects=True) == 10.05
    assert cadence.fetch_deadline() == 10.05


def test_a_transaction_longer_than_the_interval_makes_the_next_due_as_soon_as_it_ends() -> None:
    cadence = CommitCadence(interval_s=0.05)
    cadence.began(10.0)
    cadence.ended(10.2)
    assert cadence.due(effects=True) < 10.2


def test_offsets_alone_wait_longer_than_a_transaction_that_writes() -> None:
    cadence = CommitCadence(interval_s=0.05)
    cadence.began(10.0)
    cadence.ended(10.01)
    assert cadence.due(effects=False) == 10.0 + OFFSETS_ONLY_INTERVAL_S
    # An interval longer than that one rules both.
    slow = CommitCadence(interval_s=2.0)
    slow.began(10.0)
    slow.ended(10.01)
    assert slow.due(effects=False) == slow.due(effects=True) == 12.0


def test_a_fetch_during_a_transaction_waits_until_it_is_expected_to_end() -> None:
    cadence = CommitCadence(interval_s=0.05)
    cadence.began(10.0)
    cadence.ended(10.08)  # the last one took longer than an interval
    cadence.began(11.0)
    assert cadence.fetch_deadline() == 11.08
    cadence.ended(11.01)
    assert cadence.fetch_deadline() == 11.05
    cadence.began(12.0)
    assert cadence.fetch_deadline() == 12.05  # the last one was short: the interval rules

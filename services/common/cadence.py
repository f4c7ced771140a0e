"""When a runner's next transaction is due, and how long a fetch sent now may wait for it.

At most one transaction begins per commit interval, the first at once: a lone record is never held back,
while under load the records of one interval share one transaction, which is what the broker's CPU follows.
The interval spaces the transactions' starts. Counted from a transaction's end instead, each cycle would
last the interval plus the batch's handling plus its commit, and every hop of a saga would wait that much
longer for a commit that nothing but the timer holds back; under load, when a batch and its commit take
longer than an interval, the next transaction begins as soon as the last one ends either way.

Times are `time.monotonic()` seconds, passed in, so the rules are tested without a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# How long the offsets of records that changed nothing may wait for a transaction that writes something. Each
# transaction costs the broker a commit and a marker per partition, and skipped records (every reader of
# `orders` but inventory skips each OrderPlaced) would otherwise start one of their own.
OFFSETS_ONLY_INTERVAL_S = 1.0


@dataclass
class CommitCadence:
    interval_s: float
    began_at: float = -math.inf
    """When the last transaction began."""
    last_duration_s: float = 0.0
    """How long the last transaction that ended took."""
    in_flight: bool = False

    def began(self, now: float) -> None:
        self.began_at = now
        self.in_flight = True

    def ended(self, now: float) -> None:
        """A transaction ended, committed or not."""
        self.in_flight = False
        self.last_duration_s = now - self.began_at

    def due(self, *, effects: bool) -> float:
        """When what was handled since the last transaction is to be committed: at the interval when it writes
        something (`effects`), else (offsets only, which no reader waits for) after `OFFSETS_ONLY_INTERVAL_S`,
        unless a transaction that writes something carries them first."""
        if effects:
            return self.began_at + self.interval_s
        return self.began_at + max(self.interval_s, OFFSETS_ONLY_INTERVAL_S)

    def fetch_deadline(self) -> float:
        """The soonest a record fetched now can be committed, so that a fetch held until then delays none.

        While a transaction is in flight nothing read can be handled before it ends, which is expected to
        take as long as the last one did.
        """
        if self.in_flight:
            return self.began_at + max(self.interval_s, self.last_duration_s)
        return self.began_at + self.interval_s

"""The refund provider port: who returns a charge's money to the customer, and how a failed attempt is retried.

Pure and synchronous: a provider answers for one attempt at the moment `now`; retrying is the order
stage's job (see `handlers.attempt_refund`), so an outage delays a refund but never skips or doubles it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Protocol, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, model_validator

PROVIDER_UNAVAILABLE = "refund provider unavailable"


@dataclass(frozen=True)
class RefundFailure:
    """Why an attempt did not return the money; the attempt is retried later."""

    reason: str


class RefundProvider(Protocol):
    def refund(self, order_id: str, amount: Decimal, currency: str, now: datetime) -> RefundFailure | None:
        """Return `amount` of the order's charge; None once the money is returned.

        An attempt whose outcome was not committed (the task crashed or lost its partition) is made
        again, so a provider that moves real money must treat `order_id` as its idempotency key.
        """
        ...


class LedgerRefunds:
    """Production: the customer's credit is the money, so the ledger's REFUND is the refund and never fails."""

    def refund(self, order_id: str, amount: Decimal, currency: str, now: datetime) -> RefundFailure | None:
        return None


class OutageWindow(BaseModel):
    """`[start, end)` in UTC (or any offset), during which the refund provider is down."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: AwareDatetime
    end: AwareDatetime

    @model_validator(mode="after")
    def _ends_after_it_starts(self) -> Self:
        if self.end <= self.start:
            raise ValueError(f"an outage must end after it starts: {self.end.isoformat()} <= {self.start.isoformat()}")
        return self

    def covers(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


@dataclass(frozen=True)
class ScheduledOutages:
    """A drill: every attempt inside one of the windows fails as if the provider were down; others succeed."""

    windows: Sequence[OutageWindow]

    def refund(self, order_id: str, amount: Decimal, currency: str, now: datetime) -> RefundFailure | None:
        if any(window.covers(now) for window in self.windows):
            return RefundFailure(PROVIDER_UNAVAILABLE)
        return None


@dataclass(frozen=True)
class RefundBackoff:
    """Exponential backoff: `initial` after the first failure, doubling each time, never more than `maximum`."""

    initial: timedelta = timedelta(seconds=1)
    maximum: timedelta = timedelta(seconds=30)

    def __post_init__(self) -> None:
        if self.initial <= timedelta(0) or self.maximum < self.initial:
            raise ValueError(f"need 0 < initial <= maximum, got {self.initial} and {self.maximum}")

    def delay(self, failed_attempts: int) -> timedelta:
        """How long to wait after the `failed_attempts`-th failed attempt (1, 2, ...)."""
        # In float seconds, so a long outage's large multiplier cannot overflow a timedelta.
        doublings = min(max(failed_attempts - 1, 0), 64)
        seconds = min(self.initial.total_seconds() * 2.0**doublings, self.maximum.total_seconds())
        return timedelta(seconds=seconds)


@dataclass(frozen=True)
class RefundAttempt:
    """What an attempt needs: the provider, how to back off, and the moment it is made."""

    provider: RefundProvider
    backoff: RefundBackoff
    now: datetime

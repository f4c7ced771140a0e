"""Settings of the payment service (env prefix `CHOREO_`)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Self

from pydantic import Field, PrivateAttr, model_validator

from services.common.settings import ChoreoSettings, Duration
from services.payment.domain import CreditLimits, load_customers
from services.payment.refunds import OutageWindow

DEFAULT_CUSTOMERS = Path(__file__).with_name("customers.json")


class PaymentSettings(ChoreoSettings):
    health_port: int = Field(default=8102, ge=0, le=65535, description="Port of the /health endpoint.")
    payment_default_credit_limit: Decimal = Field(
        default=Decimal("5000.00"),
        ge=0,
        allow_inf_nan=False,
        description="Credit limit of a customer not listed in the customers file.",
    )
    payment_customers: Path = Field(
        default=DEFAULT_CUSTOMERS,
        description='JSON file of per-customer credit: {"<customer_id>": {"credit_limit": "<decimal string>"}}.',
    )

    payment_refund_outages: list[OutageWindow] = Field(
        default=[],
        description=(
            "Drill / fault injection: JSON list of refund provider outages, "
            '[{"start": "<ISO 8601 UTC>", "end": "<ISO 8601 UTC>"}]; every refund attempted in [start, end) '
            'fails with "refund provider unavailable" and is retried. Empty (the default) in production.'
        ),
    )
    payment_refund_retry_initial: Duration = Field(
        default=timedelta(seconds=1), description="Wait after a refund's first failed attempt (seconds or ISO 8601)."
    )
    payment_refund_retry_max: Duration = Field(
        default=timedelta(seconds=30),
        description="Longest wait between refund attempts; the wait doubles after each failure up to this.",
    )

    _credit_limits: dict[str, Decimal] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _refund_backoff_is_valid(self) -> Self:
        if self.payment_refund_retry_initial <= timedelta(0):
            raise ValueError("payment_refund_retry_initial must be positive")
        if self.payment_refund_retry_max < self.payment_refund_retry_initial:
            raise ValueError("payment_refund_retry_max must not be shorter than payment_refund_retry_initial")
        return self

    @model_validator(mode="after")
    def _customers_file_is_valid(self) -> Self:
        # Fail at start-up, naming the bad entry, rather than on the first order of that customer.
        self._credit_limits = load_customers(self.payment_customers)
        return self

    def credit_limits(self) -> CreditLimits:
        return CreditLimits(default=self.payment_default_credit_limit, customers=dict(self._credit_limits))

"""Settings of the payment service (env prefix `CHOREO_`)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Self

from pydantic import Field, PrivateAttr, model_validator

from services.common.settings import ChoreoSettings
from services.payment.domain import CreditLimits, load_customers

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

    _credit_limits: dict[str, Decimal] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _customers_file_is_valid(self) -> Self:
        # Fail at start-up, naming the bad entry, rather than on the first order of that customer.
        self._credit_limits = load_customers(self.payment_customers)
        return self

    def credit_limits(self) -> CreditLimits:
        return CreditLimits(default=self.payment_default_credit_limit, customers=dict(self._credit_limits))

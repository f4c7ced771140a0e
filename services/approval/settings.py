"""Approval's settings: the review threshold, the reviewer's deadline and the reviewer API's access."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Self

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from schemas.primitives import ISO_CURRENCIES
from services.common.settings import ChoreoSettings, Duration

DEFAULT_MAX_BODY_BYTES = 64 * 1024
"""A decision is a few hundred bytes; nothing the reviewer API accepts comes near this."""

DEV_TOKEN = "dev-token"  # noqa: S105  # public on purpose: refused outside dev
"""The reviewer token in dev mode when none is configured; never accepted outside dev."""


class ApprovalSettings(ChoreoSettings):
    approval_threshold: Decimal = Field(
        default=Decimal("1000.00"),
        ge=0,
        description="Orders whose total is at or above this amount need a reviewer (the comparison is inclusive); "
        "the threshold of every currency `approval_thresholds` does not list.",
    )
    approval_thresholds: Annotated[dict[str, Decimal], NoDecode] = Field(
        default_factory=dict,
        description="Thresholds per currency, overriding `approval_threshold` for the currencies listed; env "
        "CHOREO_APPROVAL_THRESHOLDS as `EUR=1000,USD=1100,JPY=150000` (ISO 4217 codes, amounts above zero).",
    )
    approval_timeout: Duration = Field(
        default=timedelta(hours=24),
        description="How long a reviewer has to decide; env CHOREO_APPROVAL_TIMEOUT in seconds (`90`) or ISO 8601 "
        "(`PT24H`).",
    )
    approval_escalation_fraction: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="Share of the timeout after which a still-pending approval is escalated.",
    )
    approval_token: SecretStr | None = Field(
        default=None, description="Bearer token of the reviewer API; required, and not a placeholder, outside dev."
    )
    approval_http_host: str = Field(
        default="127.0.0.1", description="Interface of the reviewer API (0.0.0.0 in containers)."
    )
    approval_http_port: int = Field(
        default=8000, ge=0, le=65535, description="Port of the reviewer API; 0 picks a free one."
    )
    health_port: int = Field(
        default=8106,
        ge=0,
        le=65535,
        description="Port of the stream runner's /health and the process's /metrics (the API serves its own "
        "/health); 0 picks a free one.",
    )

    approval_http_max_body: ByteSize = Field(
        default=ByteSize(DEFAULT_MAX_BODY_BYTES),
        gt=0,
        description="Largest request body the reviewer API reads, for example `64KiB`; a larger one gets 413 "
        "before it is read whole.",
    )

    @field_validator("approval_thresholds", mode="before")
    @classmethod
    def _parse_thresholds(cls, raw: Any) -> Any:
        if isinstance(raw, str):
            return parse_thresholds(raw)
        if isinstance(raw, Mapping):
            return checked_thresholds([(str(code), str(amount)) for code, amount in raw.items()])
        return raw

    @field_validator("approval_timeout")
    @classmethod
    def _positive(cls, timeout: timedelta) -> timedelta:
        if timeout <= timedelta(0):
            raise ValueError("must be longer than zero")
        return timeout

    @model_validator(mode="after")
    def _token_outside_dev(self) -> Self:
        if self.environment != "dev" and self.approval_token is None:
            raise ValueError(f"approval_token (CHOREO_APPROVAL_TOKEN) is required when environment={self.environment}")
        if self.environment != "dev" and self.reviewer_token() == DEV_TOKEN:
            raise ValueError(f"approval_token is the dev default {DEV_TOKEN!r}; set a real one outside dev")
        return self

    def reviewer_token(self) -> str:
        """The bearer token reviewers present: the configured one, or `dev-token` in dev mode only."""
        if self.approval_token is not None:
            return self.approval_token.get_secret_value()
        if self.environment != "dev":  # unreachable after validation; kept so no path yields a default
            raise ValueError("approval_token is required outside dev")
        return DEV_TOKEN

    def _secrets(self) -> dict[str, SecretStr | None]:
        return {**super()._secrets(), "approval_token": self.approval_token}


def parse_thresholds(text: str) -> dict[str, Decimal]:
    """`EUR=1000,USD=1100` as {currency: threshold}; every mistake in it named in one ValueError."""
    entries: list[tuple[str, str]] = []
    problems: list[str] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        code, equals, amount = entry.partition("=")
        if not equals:
            problems.append(f"{entry!r} is not CURRENCY=AMOUNT")
            continue
        entries.append((code, amount))
    try:
        thresholds = checked_thresholds(entries)
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise ValueError("; ".join(problems))
    return thresholds


def checked_thresholds(entries: list[tuple[str, str]]) -> dict[str, Decimal]:
    """{currency: threshold} from (code, amount) pairs, or a ValueError naming each bad code, amount and repeat."""
    thresholds: dict[str, Decimal] = {}
    seen: set[str] = set()
    problems: list[str] = []
    for raw_code, raw_amount in entries:
        code, text = raw_code.strip().upper(), raw_amount.strip()
        if code not in ISO_CURRENCIES:
            problems.append(f"{raw_code.strip()!r} is not an ISO 4217 currency code")
            continue
        if code in seen:
            problems.append(f"{code} is listed more than once")
            continue
        seen.add(code)
        try:
            amount = Decimal(text)
        except InvalidOperation:
            problems.append(f"{code}: {text!r} is not a number")
            continue
        if not amount.is_finite():
            problems.append(f"{code}: {text!r} is not a number")
        elif amount <= 0:
            problems.append(f"{code}: the threshold must be above zero, not {text}")
        else:
            thresholds[code] = amount
    if problems:
        raise ValueError("; ".join(problems))
    return thresholds

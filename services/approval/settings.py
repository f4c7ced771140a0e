"""Approval's settings: the review threshold, the reviewer's deadline and the reviewer API's access."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator

from services.common.settings import ChoreoSettings, Duration

DEV_TOKEN = "dev-token"  # noqa: S105  # public on purpose: refused outside dev
"""The reviewer token in dev mode when none is configured; never accepted outside dev."""


class ApprovalSettings(ChoreoSettings):
    approval_threshold: Decimal = Field(
        default=Decimal("1000.00"),
        ge=0,
        description="Orders whose total is at or above this amount need a reviewer (the comparison is inclusive).",
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

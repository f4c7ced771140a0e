"""Settings of the audit service (environment variables `CHOREO_*`)."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field, field_validator

from services.common.settings import ChoreoSettings, Duration


class AuditSettings(ChoreoSettings):
    health_port: int = Field(default=8105, ge=0, le=65535, description="Port of the audit service's /health.")
    audit_causal_wait: Duration = Field(
        default=timedelta(seconds=10),
        description=(
            "How long an event waits for its cause before it is written anyway (the cause may have been "
            "dead-lettered); env CHOREO_AUDIT_CAUSAL_WAIT in seconds (`10`) or ISO 8601 (`PT10S`)."
        ),
    )

    @field_validator("audit_causal_wait")
    @classmethod
    def _not_negative(cls, wait: timedelta) -> timedelta:
        if wait < timedelta(0):
            raise ValueError("must not be negative")
        return wait

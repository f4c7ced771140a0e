"""Settings of the monitor (environment variables `CHOREO_*`)."""

from __future__ import annotations

import re
from typing import Self

from pydantic import Field, model_validator

from services.common.settings import ChoreoSettings

# The alert subject `service:<name>` is an envelope order_id: at most 64 identifier characters.
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,55}")

# What `choreo run` starts on this machine; in containers every service answers on :8080 instead,
# so compose sets CHOREO_MONITOR_TARGETS.
DEFAULT_TARGETS: dict[str, str] = {
    "inventory": "http://127.0.0.1:8101/health",
    "payment": "http://127.0.0.1:8102/health",
    "shipping": "http://127.0.0.1:8103/health",
    "audit": "http://127.0.0.1:8105/health",
    "approval": "http://127.0.0.1:8000/health",
}


class MonitorSettings(ChoreoSettings):
    health_port: int = Field(
        default=8104, ge=0, le=65535, description="Port of the monitor's HTTP server: /health and /monitor/*."
    )
    monitor_interval: float = Field(
        default=300.0, gt=0, description="Seconds between two health checks of a healthy service (fractions allowed)."
    )
    monitor_unhealthy_interval: float | None = Field(
        default=None,
        gt=0,
        description="Seconds between checks of a service that failed its last check; default a quarter of "
        "monitor_interval.",
    )
    monitor_failure_threshold: int = Field(
        default=2, ge=1, description="Consecutive failed checks after which a service is reported degraded."
    )
    monitor_check_timeout: float = Field(default=5.0, gt=0, description="Seconds one /health request may take.")
    monitor_targets: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_TARGETS),
        description="Services to check, as a JSON object name -> health URL (CHOREO_MONITOR_TARGETS).",
    )
    monitor_saga_sla: float = Field(
        default=25 * 3600.0,
        gt=0,
        description="Seconds an order may stay without a terminal event before it is flagged SagaStuck; the "
        "default outlasts the approval timeout (24 h) by an hour.",
    )
    monitor_instance_id: str = Field(
        default="monitor-1",
        min_length=1,
        description="Static consumer-group member id: a restarted monitor takes its partitions back at once "
        "instead of waiting for the dead member's session to expire.",
    )
    monitor_session_timeout: float = Field(
        default=30.0, gt=0, description="Kafka consumer session timeout of the monitor, in seconds."
    )

    @model_validator(mode="after")
    def _targets_are_urls(self) -> Self:
        for name, url in self.monitor_targets.items():
            if _SERVICE_NAME.fullmatch(name) is None:
                raise ValueError(
                    f"monitor_targets: service name {name!r} must be 1 to 56 letters, digits, '.', '_' or '-'"
                )
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"monitor_targets: {name} has {url!r}, which is not an http(s) URL")
        return self

    @property
    def unhealthy_interval(self) -> float:
        return self.monitor_unhealthy_interval or self.monitor_interval / 4

    @property
    def sla_tick(self) -> float:
        """How often open sagas are compared with the SLA: a twentieth of it, at most once a minute.

        Each sweep reads every open saga, and with a day-long SLA many may be open (waiting for a
        reviewer), so the sweep is as rare as the SLA allows.
        """
        return min(60.0, max(0.05, self.monitor_saga_sla / 20))

"""The monitor's metrics: health checks run, SLA rounds and alerts raised.

Counted as the engine does the work; an alert published again after a crash (its intent found
pending on restart) is counted again, as it is sent again.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from schemas.events import MONITOR_EVENTS

HEALTHY = "healthy"
UNHEALTHY = "unhealthy"


class MonitorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, targets: tuple[str, ...] = ()) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.checks = Counter(
            "choreo_monitor_checks",
            "Health checks of the monitored services, by target and outcome (healthy, unhealthy).",
            ["target", "outcome"],
            registry=self.registry,
        )
        self.sla_rounds = Counter(
            "choreo_monitor_sla_rounds",
            "Rounds of the saga SLA check over the owned partitions.",
            registry=self.registry,
        )
        self.alerts = Counter(
            "choreo_monitor_alerts",
            "Alerts published on monitor.alerts, by type (ServiceDegraded, ServiceRecovered, SagaStuck).",
            ["type"],
            registry=self.registry,
        )
        for target in targets:
            for outcome in (HEALTHY, UNHEALTHY):
                self.checks.labels(target, outcome)
        for event in MONITOR_EVENTS:
            self.alerts.labels(event.__name__)

    def checked(self, target: str, healthy: bool) -> None:
        self.checks.labels(target, HEALTHY if healthy else UNHEALTHY).inc()

    def alerted(self, alert_type: str) -> None:
        self.alerts.labels(alert_type).inc()

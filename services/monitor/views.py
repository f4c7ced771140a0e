"""The read side: the documents served on /monitor/* and printed by `choreo monitor`, from the records."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from services.monitor.domain import LatencyHistogram, PartitionStats, SagaRecord, ServiceHealth

PERCENTILES = (0.5, 0.9, 0.95, 0.99)


def _time(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z") if value else None


def services_document(services: Iterable[ServiceHealth]) -> dict[str, Any]:
    return {
        "services": [
            {
                "service": health.service,
                "url": health.url,
                "status": health.status,
                "last_seen": _time(health.last_seen),
                "consecutive_failures": health.consecutive_failures,
                "last_change": _time(health.last_change),
                "check_count": health.check_count,
                "next_check_at": _time(health.next_check_at),
                "last_error": health.last_error,
            }
            for health in sorted(services, key=lambda h: h.service)
        ]
    }


def latency_document(stats: Iterable[PartitionStats]) -> dict[str, Any]:
    histogram = LatencyHistogram.merge([s.latency for s in stats])
    return {
        "finished": histogram.count,
        "mean_seconds": round(histogram.total_seconds / histogram.count, 3) if histogram.count else None,
        "max_seconds": round(histogram.max_seconds, 3) if histogram.count else None,
        **{f"p{round(q * 100)}_seconds": _rounded(histogram.percentile(q)) for q in PERCENTILES},
    }


def stuck_document(
    sagas: Iterable[SagaRecord], stats: Iterable[PartitionStats], sla_seconds: float, now: datetime | None = None
) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    open_sagas = [saga for saga in sagas if saga.finished_at is None]
    stuck = sorted((saga for saga in open_sagas if saga.stuck_at is not None), key=lambda saga: saga.opened_at)
    return {
        "sla_seconds": sla_seconds,
        "open": len(open_sagas),
        "stuck": [
            {
                "order_id": saga.order_id,
                "opened_at": _time(saga.opened_at),
                "open_for_seconds": round((now - saga.opened_at).total_seconds(), 3),
                "last_event_type": saga.last_event_type,
                "last_event_at": _time(saga.last_event_at),
                "flagged_at": _time(saga.stuck_at),
            }
            for saga in stuck
        ],
        "latency": latency_document(stats),
    }


def _rounded(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def render_text(services: dict[str, Any], stuck: dict[str, Any]) -> str:
    """Both documents as the plain text `choreo monitor` prints."""
    lines = ["SERVICE          STATUS     CHECKS  FAILS  LAST SEEN                 LAST CHANGE"]
    for row in services["services"]:
        lines.append(
            f"{row['service']:<16} {row['status']:<10} {row['check_count']:>6}  {row['consecutive_failures']:>5}  "
            f"{row['last_seen'] or '-':<25} {row['last_change'] or '-'}"
        )
    if not services["services"]:
        lines.append("(no service checked yet)")
    latency = stuck["latency"]
    lines.append("")
    lines.append(
        f"sagas: {stuck['open']} open, {len(stuck['stuck'])} stuck (SLA {stuck['sla_seconds']:g} s); "
        f"{latency['finished']} finished, latency p50 {_seconds(latency['p50_seconds'])}, "
        f"p90 {_seconds(latency['p90_seconds'])}, p99 {_seconds(latency['p99_seconds'])}, "
        f"max {_seconds(latency['max_seconds'])}"
    )
    for saga in stuck["stuck"]:
        lines.append(
            f"  STUCK {saga['order_id']}: open {saga['open_for_seconds']:g} s since {saga['opened_at']}, "
            f"last {saga['last_event_type']} at {saga['last_event_at']}, flagged {saga['flagged_at']}"
        )
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:g} s"

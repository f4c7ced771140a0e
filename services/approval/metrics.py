"""Approval's metrics: reviewers' decisions as the stream side rules on them, and approvals pending.

Decisions are counted once their ruling commits. The pending count comes from the reviewer API's
read model, which holds every approval of every partition: each approval instance reports the
whole stack's count, so aggregate it with `max`, not `sum`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import Counter
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

APPROVED = "approved"
DENIED = "denied"
IGNORED = "ignored"
"""The decision arrived once the approval was closed (decided, timed out, cancelled) or never requested."""
TIMED_OUT = "timed_out"
"""No decision before the deadline."""
DECISIONS = (APPROVED, DENIED, IGNORED, TIMED_OUT)


class ApprovalMetrics:
    """Built unregistered: the process's wiring registers `collectors()`."""

    def __init__(self) -> None:
        self.decisions = Counter(
            "choreo_approval_decisions",
            "Reviewers' decisions as ruled (approved, denied, ignored) and approvals that timed out.",
            ["decision"],
            registry=None,
        )
        for decision in DECISIONS:
            self.decisions.labels(decision)

    def collectors(self) -> Sequence[Collector]:
        return (self.decisions,)

    def decided(self, decision: str) -> Callable[[], None]:
        """The count of one `decision`, to run once its ruling has committed."""
        return self.decisions.labels(decision).inc


class PendingApprovals:
    """`choreo_approvals_pending`, read from `count` at scrape time."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count

    def describe(self) -> Iterable[Metric]:
        return [self._family(None)]

    def collect(self) -> Iterable[Metric]:
        return [self._family(self.count())]

    @staticmethod
    def _family(value: int | None) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "choreo_approvals_pending",
            "Approvals waiting for a reviewer's decision, as the reviewer API's read model has them "
            "(every instance sees them all: aggregate with max).",
            value=value,
        )

"""Prometheus metrics of the stream runner, and what every service's metrics share.

Each process builds one `CollectorRegistry` in its wiring (`services.common.service.serve`, the
monitor's `Monitor`) and serves it on `/metrics` beside `/health`; nothing registers in the
client's global default registry, so tests build as many runners as they like side by side.

What a transaction did is tallied on its `TaskContext` (`Tally`) and reaches the counters only
once the transaction commits: an aborted or fenced transaction counts nothing, and the records it
carried are counted when they are processed again. Labels are bounded: service, registry topic
name, partition number, outcome, reason category, step, type; never an order, customer or event id.
"""

from __future__ import annotations

import re
import time
from collections import Counter as Tallies
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from schemas.topics import Topic
    from services.common.processor import Incoming, StreamApp, TaskContext

# --- what became of a record -----------------------------------------------------------------------

HANDLED = "handled"
"""The service's handler took the record (whatever it then emitted)."""
SKIPPED = "skipped"
"""Skipped unparsed: its `ce_type` header names an event type the service does not handle, or it is a
client's record on another partition than its key's, which the topic's router forwards."""
FORWARDED = "forwarded"
"""A client's record found on another partition than its key's, sent on unchanged to that one by its topic's
router (its other readers count it skipped)."""
DEAD_LETTERED = "dead_lettered"
"""Sent to `deadletter` with its reason, by the service or because its handler failed."""
OUTCOMES = (HANDLED, SKIPPED, FORWARDED, DEAD_LETTERED)
"""In rising precedence: a record marked twice keeps the later of the two here."""

# --- why a record was dead-lettered ----------------------------------------------------------------

DEAD_LETTER_REASONS = (
    "partition",
    "type",
    "key",
    "json",
    "validation",
    "expired",
    "unknown_order",
    "handler_error",
    "other",
)
"""Every value of the `reason` label: the category of a dead letter's reason, never its text."""

_REASON_PREFIXES = {
    "partition": "partition",
    "type": "type",
    "key": "key",
    "value": "json",  # an empty (null) value
    "not_json": "json",
    "expired": "expired",
    "unknown_order": "unknown_order",
    "handler_error": "handler_error",
}
# A field path as `describe_validation_error` names it (`data.items.0.quantity`), or `invalid <Model>`.
_FIELD_PATH = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*$")


def dead_letter_category(reason: str) -> str:
    """The category of a dead letter's reason: its prefix before ':' mapped to `DEAD_LETTER_REASONS`."""
    head, colon, _ = reason.partition(":")
    prefix = head.strip().lower().replace(" ", "_")
    if prefix in _REASON_PREFIXES:
        return _REASON_PREFIXES[prefix]
    if prefix.startswith("not_a_json"):
        return "json"
    if colon and (prefix.startswith("invalid_") or _FIELD_PATH.match(head.strip())):
        return "validation"
    return "other"


@runtime_checkable
class HasMetrics(Protocol):
    """An app with metrics of its own, built unregistered; the wiring registers them in the process's registry."""

    def collectors(self) -> Iterable[Collector]: ...


# --- what a transaction did -------------------------------------------------------------------------


@dataclass
class Tally:
    """One task's counts in the open transaction, and what runs once it commits."""

    records: Tallies[tuple[str, str]] = field(default_factory=Tallies)
    """(registry topic, outcome) of every record processed."""
    dead_letters: Tallies[tuple[str, str]] = field(default_factory=Tallies)
    """(registry topic, reason category) of every dead letter."""
    callbacks: list[Callable[[], None]] = field(default_factory=list)
    _current: Incoming | None = None
    _outcome: str = HANDLED

    def begin(self, message: Incoming) -> None:
        self._current, self._outcome = message, HANDLED

    def mark(self, outcome: str) -> None:
        """What became of the record being processed, when it was not simply handled."""
        if self._current is not None and OUTCOMES.index(outcome) > OUTCOMES.index(self._outcome):
            self._outcome = outcome

    def dead_lettered(self, message: Incoming, reason: str) -> None:
        self.dead_letters[(message.topic.name, dead_letter_category(reason))] += 1
        if message is self._current:
            self.mark(DEAD_LETTERED)

    def end(self) -> None:
        if self._current is not None:
            self.records[(self._current.topic.name, self._outcome)] += 1
        self._current, self._outcome = None, HANDLED

    @property
    def record_count(self) -> int:
        return sum(self.records.values())


class MeteredApp:
    """A `StreamApp` whose every processed record is tallied with its outcome.

    A handler that raises has its record dead-lettered by the runner, so the record is counted as
    dead-lettered here; the runner's `dead_letter` call that follows adds the reason category.
    """

    def __init__(self, app: StreamApp) -> None:
        self.wrapped = app
        self.name = app.name
        self.inputs: Sequence[Topic] = app.inputs
        self.changelog: Topic = app.changelog
        self.in_process: Sequence[Topic] = app.in_process
        self.mostly_skipped: Sequence[Topic] = app.mostly_skipped

    def process(self, task: TaskContext, message: Incoming) -> None:
        task.tally.begin(message)
        try:
            self.wrapped.process(task, message)
        except Exception:
            task.tally.mark(DEAD_LETTERED)
            raise
        finally:
            task.tally.end()

    def tick(self, task: TaskContext, now: datetime) -> None:
        self.wrapped.tick(task, now)


# --- the runner's metrics ---------------------------------------------------------------------------

# Batches and commits take milliseconds; a broker in trouble stretches them to seconds.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RECORDS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

LagRows = Callable[[], Iterable[tuple[str, int, int]]]
"""(registry topic, partition, records behind) of each partition an instance owns."""


class ConsumerLag:
    """`choreo_consumer_lag_records`, computed at scrape time from what the consumer last fetched."""

    def __init__(self, service: str, rows: LagRows) -> None:
        self.service = service
        self.rows = rows

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for topic, partition, behind in self.rows():
            family.add_metric([self.service, topic, str(partition)], behind)
        return [family]

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "choreo_consumer_lag_records",
            "Committed records on an owned input partition that this instance has not read yet "
            "(last stable offset minus the consumer's position, as of its last fetch).",
            labels=["service", "topic", "partition"],
        )


def fetched_lag(consumer: Any) -> Iterator[tuple[Any, int]]:
    """(TopicPartition, records behind) of each assigned partition the consumer has fetched from.

    aiokafka keeps the position, highwater and last stable offset of each partition in its
    subscription state; `position()` is a coroutine only to wait for a position to be known, so
    the state is read directly here, as `highwater()` and `last_stable_offset()` do themselves.
    """
    subscription = consumer._subscription.subscription
    assignment = subscription.assignment if subscription is not None else None
    if assignment is None:
        return
    for tp in assignment.tps:
        state = assignment.state_value(tp)
        if state is None or not state.has_valid_position:
            continue
        # read_committed: the consumer can read up to the last stable offset, never past it.
        end = state.lso if state.lso is not None and state.lso >= 0 else state.highwater
        if end is not None:
            yield tp, max(0, end - state.position)


class RunnerMetrics:
    """The metrics of one `TransactionalRunner`, registered in `registry` (a fresh one by default)."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.records = Counter(
            "choreo_records_processed",
            "Input records processed and committed, by registry topic and outcome "
            "(handled, skipped unparsed, forwarded, dead_lettered).",
            ["service", "topic", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "choreo_dead_letters",
            "Records sent to the dead-letter topic, by the topic they came from and the reason's category.",
            ["service", "topic", "reason"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "choreo_batch_duration_seconds",
            "Time to handle one polled batch of records (before its commit).",
            ["service"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "choreo_transaction_commit_duration_seconds",
            "Time to commit one transaction: its records, offsets and state changes.",
            ["service"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.records_per_transaction = Histogram(
            "choreo_transaction_records",
            "Input records one committed transaction carried (read from topics or handed over in process).",
            ["service"],
            buckets=RECORDS_BUCKETS,
            registry=r,
        )
        self.aborts = Counter(
            "choreo_transaction_aborts",
            "Transactions that failed and were aborted; their records are processed again.",
            ["service"],
            registry=r,
        )
        self.assignments = Counter(
            "choreo_assignments_taken", "Partition assignments taken (after a rebalance).", ["service"], registry=r
        )
        self.revocations = Counter(
            "choreo_assignments_revoked", "Partition assignments revoked (a rebalance began).", ["service"], registry=r
        )
        self.fenced_owners = Counter(
            "choreo_fenced_owners",
            "Earlier owners of a partition fenced before this instance took it over.",
            ["service"],
            registry=r,
        )
        self.fenced = Counter(
            "choreo_fenced",
            "Times this instance found itself fenced by a newer owner (it then stops and restarts).",
            ["service"],
            registry=r,
        )
        for metric in (self.aborts, self.assignments, self.revocations, self.fenced_owners, self.fenced):
            metric.labels(service)

    def follow(self, inputs: Iterable[Topic], lag: LagRows) -> None:
        """Start every outcome of every input at zero, and report `lag` as the consumer lag gauge."""
        for topic in inputs:
            for outcome in OUTCOMES:
                self.records.labels(self.service, topic.name, outcome)
        self.registry.register(ConsumerLag(self.service, lag))

    def committed(self, contexts: Iterable[TaskContext], commit_seconds: float) -> None:
        """Count what a transaction did, once it has committed."""
        service = self.service
        records = 0
        for context in contexts:
            tally = context.tally
            for (topic, outcome), count in tally.records.items():
                self.records.labels(service, topic, outcome).inc(count)
            for (topic, reason), count in tally.dead_letters.items():
                self.dead_letters.labels(service, topic, reason).inc(count)
            records += tally.record_count
        self.commit_seconds.labels(service).observe(commit_seconds)
        self.records_per_transaction.labels(service).observe(records)

    def batch_handled(self, started: float) -> None:
        self.batch_seconds.labels(self.service).observe(time.perf_counter() - started)


def process_registry() -> CollectorRegistry:
    """The one registry of a process, with the process's CPU, memory and open files (`process_*`)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus's text format (served with `CONTENT_TYPE_LATEST`)."""
    return generate_latest(registry)

"""The fault-injection run: the whole stack on a private broker, a steady order load, faults, recovery and report.

`FaultRun` owns everything a run touches: the broker (so killing it cannot hurt other tests), one
process per service (instance 1 of each on a fixed health port, so the monitor can check it), a
supervisor that restarts a service that exits on its own (as `choreo run` does), the load, the log
of faults with their times, and the checks each scenario leaves for the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from schemas.envelope import Envelope, Source
from schemas.events import ApprovalDecisionSubmitted, OrderCancellationRequested
from schemas.topics import (
    APPROVAL_STATE,
    AUDIT_STATE,
    DEAD_LETTER,
    INVENTORY_STATE,
    MONITOR_ALERTS,
    PAYMENT_STATE,
    SHIPPING_STATE,
    Topic,
    topic_of,
)
from services.common.broker import LocalBroker, LocalCluster
from services.common.kafka import producer
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from tests.e2e.processes import ProcessStack, ServiceProcess, service_env
from tests.kafka_fixtures import free_port
from tests.support import eventually, read_topic
from tests.workload import (
    ANTARCTICA,
    LARGE,
    LARGE_DENIED,
    LARGE_GRANTED,
    NO_CREDIT,
    PLAIN,
    SCARCE,
    TERMINALS,
    UNKNOWN_SKU,
    PlannedOrder,
    Run,
    Timeline,
    audit_timelines,
    barrier_orders,
    latencies,
    make_order,
    missing_terminals,
    outcome_summary,
    percentile,
    run_violations,
    seed,
    settle_and_verify,
    workload_env,
)

log = logging.getLogger(__name__)

# Each run's report, printed by the suite's `pytest_terminal_summary`.
REPORTS = pytest.StashKey[list[str]]()

# Downstream first, so nothing is produced for a service that is not consuming yet.
SAGA_SERVICES: tuple[str, ...] = ("audit", "shipping", "approval", "payment", "inventory")
CHANGELOGS: dict[str, Topic] = {
    "audit": AUDIT_STATE,
    "shipping": SHIPPING_STATE,
    "approval": APPROVAL_STATE,
    "payment": PAYMENT_STATE,
    "inventory": INVENTORY_STATE,
}
ALL_SERVICES: tuple[str, ...] = ("monitor", *SAGA_SERVICES)
APPROVAL_TIMEOUT_S = 6.0
DECISION_DELAY_S = (0.8, 2.0)
MONITOR_INTERVAL_S = "1"
DUPLICATE_SHARE = 0.05
DUPLICATE_DELAY_S = (0.5, 8.0)
RESTART_BACKOFF_MAX_S = 4.0
HEALTHY_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 120.0

# The saga services' order horizon in a fault run (see Profile.order_retention_s).
DEFAULT_ORDER_RETENTION_S = 60.0

KINDS = (PLAIN, UNKNOWN_SKU, SCARCE, NO_CREDIT, ANTARCTICA, LARGE, LARGE_GRANTED, LARGE_DENIED)
WEIGHTS = (50, 8, 5, 8, 8, 5, 8, 8)
CANCEL_SHARE = 0.12


@dataclass(frozen=True)
class Profile:
    """How big a run is: the reduced one runs in `make test`, the full one in `make faults`."""

    name: str
    rate: float  # orders per second, through the whole run
    rounds: int  # how many times the whole schedule of faults is injected
    gap_s: tuple[float, float]  # load between two faults
    kill_together: int  # services SIGKILLed at the same moment (several at once keep the reduced run short)
    timeout_s: float  # the whole test, as pytest-timeout enforces it
    # The order retention horizon of every saga service. Far shorter than the run, so finished orders
    # expire while faults go on; far longer than any client message trails its order (a duplicate is
    # at most DUPLICATE_DELAY_S late, plus the longest recovery), so no input arrives after its horizon.
    order_retention_s: float = DEFAULT_ORDER_RETENTION_S

    @classmethod
    def chosen(cls) -> Profile:
        wanted = os.environ.get("CHOREO_FAULTS", "").strip().lower() or "reduced"
        horizon = float(os.environ.get("CHOREO_FAULTS_ORDER_RETENTION", DEFAULT_ORDER_RETENTION_S))
        if wanted == "full":
            return cls("full", rate=4.0, rounds=3, gap_s=(2.0, 6.0), kill_together=1, timeout_s=3600,
                       order_retention_s=horizon)  # fmt: skip
        if wanted == "reduced":
            return cls("reduced", rate=2.5, rounds=1, gap_s=(0.5, 1.5), kill_together=3, timeout_s=900,
                       order_retention_s=horizon)  # fmt: skip
        raise ValueError(f"CHOREO_FAULTS must be reduced or full, not {wanted!r}")


@dataclass
class Fault:
    """One injected fault: when (seconds since the run started), what, and how long until the stack recovered."""

    name: str
    target: str
    injected: float
    released: float | None = None
    recovered: float | None = None
    detail: str = ""

    def line(self) -> str:
        down = f"released after {self.released - self.injected:5.1f} s" if self.released is not None else ""
        if self.recovered is None:
            healed = "NOT RECOVERED"
        else:
            healed = f"recovered in {self.recovered - self.injected:5.1f} s"
            if self.released is not None:
                healed += f" ({self.recovered - self.released:.1f} s after release)"
        return f"t+{self.injected:6.1f}s  {self.name:<14} {self.target:<11} {down:<23} {healed}  {self.detail}".rstrip()


class PinnedPortProcess(ServiceProcess):
    """An instance whose /health is on the port the test gave it (the monitor's targets name those ports)."""

    def _find_health_port(self) -> int | None:
        pinned = int(self.env.get("CHOREO_HEALTH_PORT", "0"))
        return pinned or super()._find_health_port()


class Supervisor:
    """Restarts a service process that exited without the test stopping it, with a short backoff, like `choreo run`."""

    def __init__(self, stack: ProcessStack, timeline: Timeline) -> None:
        self.stack = stack
        self.timeline = timeline
        self.restarts: Counter[str] = Counter()
        self.exits: list[str] = []
        self._held: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="supervisor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def hold(self, process: ServiceProcess) -> Iterator[None]:
        """Leave `process` alone meanwhile: the test itself watches how it ends."""
        self._held.add(process.label)
        try:
            yield
        finally:
            self._held.discard(process.label)

    async def _watch(self) -> None:
        while True:
            for process in self.stack.processes:
                if process.label in self._held or process.popen is None or process.expected_down:
                    continue
                code = process.popen.poll()
                if code is None:
                    continue
                self.restarts[process.label] += 1
                delay = min(RESTART_BACKOFF_MAX_S, 0.25 * 2 ** self.restarts[process.label])
                tail = [line for line in process.log_tail(30).splitlines() if "Error" in line][-1:]
                self.exits.append(f"{process.label} exited with {code} ({tail[0][:200] if tail else 'no error'})")
                self.timeline.note(f"{process.label} exited with {code}; the supervisor restarts it in {delay:.1f} s")
                await asyncio.sleep(delay)
                if process.popen.poll() is not None and not process.expected_down:
                    process.start()
            await asyncio.sleep(0.5)


@dataclass(order=True)
class _Send:
    at: float
    sequence: int
    topic: str = field(compare=False)
    key: bytes = field(compare=False)
    value: bytes = field(compare=False)
    event_id: str = field(compare=False)
    duplicate: bool = field(compare=False, default=False)


class Load:
    """A steady stream of orders at `rate` per second, with cancellations, reviewers' decisions and duplicates.

    Every client message is delivered however long the broker is away: a send that fails is sent
    again (the same bytes, so the services see at most a duplicate, which they ignore).
    """

    def __init__(self, run: FaultRun) -> None:
        self.run = run
        self.rng = run.rng
        self.counts: Counter[str] = Counter()
        self._due: list[_Send] = []
        self._sequence = itertools.count()
        self._deliveries: set[asyncio.Task[None]] = set()
        self._client: AIOKafkaProducer | None = None
        self._placing = True
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._client = producer(self.run.settings)
        await self._client.start()
        self._tasks = [
            asyncio.create_task(self._place(), name="load-place"),
            asyncio.create_task(self._send_due(), name="load-send"),
        ]

    async def stop(self) -> None:
        """Stop placing orders, send what is still scheduled (cancellations, decisions, duplicates), then close."""
        self._placing = False
        await self._tasks[0]
        await eventually(self._idle, bool, timeout=PROBE_TIMEOUT_S, interval=0.2)
        self._tasks[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._tasks[1]
        if self._client is not None:
            await self._client.stop()

    async def _idle(self) -> bool:
        return not self._due and not self._deliveries

    def place(self, planned: PlannedOrder, delay: float = 0.0) -> None:
        """Send an order now (and whatever it implies later): used by the steady load and by scenarios."""
        self.run.orders.append(planned)
        self.counts[planned.kind] += 1
        if self.run.active is None:
            self.run.quiet.add(planned.order_id)
        now = time.monotonic()
        self._schedule(now + delay, planned.placed)
        if planned.cancel is not None:
            moment = self.rng.random()
            offset = -0.001 if moment < 0.1 else 0.0 if moment < 0.3 else self.rng.uniform(0.0, 3.0)
            self._schedule(now + delay + offset, planned.cancel)
            self.counts["cancellations"] += 1
        if planned.kind in (LARGE_GRANTED, LARGE_DENIED):
            decision = Envelope.new(
                ApprovalDecisionSubmitted(
                    approved=planned.kind == LARGE_GRANTED, reviewer="fault-suite", comment="decided under load"
                ),
                order_id=planned.order_id,
                source=Source.APPROVAL,
            )
            self._schedule(now + delay + self.rng.uniform(*DECISION_DELAY_S), decision)
            self.counts["decisions"] += 1

    async def send_raw(self, topic: str, key: bytes, value: bytes, partition: int) -> None:
        """A record exactly as given, on the given partition (poison), once the broker has it."""
        assert self._client is not None
        await self._client.send_and_wait(topic, value, key=key, partition=partition)

    def _schedule(self, at: float, envelope: Envelope, *, duplicate: bool = False) -> None:
        topic = self.run.settings.topic(topic_of(type(envelope.data)))
        send = _Send(at, next(self._sequence), topic, envelope.key, envelope.to_bytes(), str(envelope.event_id))
        send.duplicate = duplicate
        heapq.heappush(self._due, send)
        if not duplicate and self.rng.random() < DUPLICATE_SHARE:
            again = _Send(at + self.rng.uniform(*DUPLICATE_DELAY_S), next(self._sequence), topic, send.key, send.value,
                          send.event_id, duplicate=True)  # fmt: skip
            heapq.heappush(self._due, again)

    async def _place(self) -> None:
        started = time.monotonic()
        for number in itertools.count():
            if not self._placing:
                return
            kind = self.rng.choices(KINDS, WEIGHTS)[0]
            planned = make_order(self.rng, f"{self.run.prefix}-{number:05d}", kind)
            if self.rng.random() < CANCEL_SHARE:
                planned.cancel = Envelope.new(
                    OrderCancellationRequested(reason="customer changed their mind"),
                    order_id=planned.order_id,
                    source=Source.CLIENT,
                )
            self.place(planned)
            await asyncio.sleep(max(0.0, started + (number + 1) / self.run.profile.rate - time.monotonic()))

    async def _send_due(self) -> None:
        while True:
            now = time.monotonic()
            while self._due and self._due[0].at <= now:
                send = heapq.heappop(self._due)
                if send.event_id not in self.run.sent:
                    self.run.sent[send.event_id] = datetime.now(UTC)
                if send.duplicate:
                    self.counts["duplicates re-published"] += 1
                delivery = asyncio.create_task(self._deliver(send))
                self._deliveries.add(delivery)
                delivery.add_done_callback(self._deliveries.discard)
            await asyncio.sleep(0.01)

    async def _deliver(self, send: _Send) -> None:
        assert self._client is not None
        for attempt in itertools.count(1):
            try:
                await (await self._client.send(send.topic, send.value, key=send.key))
                if not send.duplicate:
                    self.run.acknowledged[send.event_id] = send.topic
                return
            except KafkaError as error:
                self.counts["sends retried"] += 1
                log.warning("send of %s failed (attempt %d): %r; sending again", send.event_id, attempt, error)
                await asyncio.sleep(1.0)


class FaultRun(Run):
    """A `Run` of the shared workload with the fault suite's broker, supervisor, load and report."""

    def __init__(
        self, settings: ChoreoSettings, broker: LocalBroker | LocalCluster, tmp_path: Path, profile: Profile
    ) -> None:
        chosen = seed()
        timeline = Timeline(chosen, tmp_path / "timeline.txt")
        env = workload_env(tmp_path, approval_timeout=str(APPROVAL_TIMEOUT_S))
        super().__init__(settings, ProcessStack(settings, tmp_path / "logs", env), timeline, random.Random(chosen), [])
        self.broker = broker
        self.tmp_path = tmp_path
        self.profile = profile
        self.prefix = "f"
        self.faults: list[Fault] = []
        self.active: Fault | None = None  # injected and not recovered yet
        self.quiet: set[str] = set()  # orders placed while no fault was active
        self.supervisor = Supervisor(self.stack, timeline)
        self.load = Load(self)
        # Checks a scenario can only make once everything has settled: each returns its violations.
        self.final_checks: list[Callable[[], Awaitable[list[str]]]] = []
        self.notes: list[str] = []
        self.final_checks.append(self.orders_expired)
        self.ports = {name: free_port() for name in ALL_SERVICES}
        # Client messages the broker acknowledged (event id -> topic): I4 wants every one of them kept.
        self.acknowledged: dict[str, str] = {}
        self._probes = itertools.count()

    # --- the stack -------------------------------------------------------------------------------

    def add(self, name: str) -> ServiceProcess:
        """A new instance of `name`; the first one of each service gets its fixed health port."""
        instance = 1 + len(self.stack.instances(name))
        overrides = {**self.stack.overrides.get(name, {}), **self._service_env(name, instance)}
        process = PinnedPortProcess(name, instance, service_env(self.settings, name, overrides), self.stack.log_dir)
        self.stack.processes.append(process)
        return process

    def _service_env(self, name: str, instance: int) -> dict[str, str]:
        env = {"CHOREO_HEALTH_PORT": str(self.ports[name] if instance == 1 else 0)}
        if name in SAGA_SERVICES:
            env["CHOREO_ORDER_RETENTION"] = f"{self.profile.order_retention_s:g}"
        if name == "monitor":
            targets = {other: f"http://127.0.0.1:{self.ports[other]}/health" for other in SAGA_SERVICES}
            env |= {
                "CHOREO_MONITOR_TARGETS": json.dumps(targets),
                "CHOREO_MONITOR_INTERVAL": MONITOR_INTERVAL_S,
                "CHOREO_MONITOR_INSTANCE_ID": f"monitor-{instance}",
            }
        return env

    def primary(self, name: str) -> ServiceProcess:
        return self.stack.instances(name)[0]

    async def start(self) -> None:
        self.timeline.note(f"{self.profile.name} run, seed {self.timeline.seed}; logs in {self.stack.log_dir}")
        await ensure_topics(self.settings)
        started = []
        for name in ALL_SERVICES:
            process = self.add(name)
            process.start()
            started.append(process)
        await asyncio.gather(*(process.wait_healthy(HEALTHY_TIMEOUT_S) for process in started))
        self.timeline.note("every service healthy")
        self.supervisor.start()
        await self.load.start()

    async def close(self) -> None:
        await self.supervisor.stop()
        self.stack.close()

    async def all_healthy(self) -> bool:
        """Every instance that should run answers 200 on /health."""
        wanted = [process for process in self.stack.processes if not process.expected_down]
        answers = await asyncio.gather(*(process.health() for process in wanted))
        return all(answer is not None and answer[0] == 200 for answer in answers)

    # --- faults ------------------------------------------------------------------------------------

    def inject(self, name: str, target: str, detail: str = "") -> Fault:
        fault = Fault(name, target, self.timeline.elapsed(), detail=detail)
        self.faults.append(fault)
        self.active = fault
        self.timeline.note(f"fault {name} on {target} {detail}".rstrip())
        return fault

    def release(self, fault: Fault) -> None:
        fault.released = self.timeline.elapsed()

    async def recover(self, fault: Fault) -> None:
        """Wait until every instance is healthy and one probe order per partition has ended; note the time."""
        await eventually(self.all_healthy, bool, timeout=HEALTHY_TIMEOUT_S, interval=0.3)
        probes = barrier_orders(self.rng, self.settings.partitions, f"{self.prefix}-probe{next(self._probes)}")
        for planned in probes:
            self.load.place(planned)
        await eventually(lambda: missing_terminals(self.settings, probes), lambda missing: not missing,
                         timeout=PROBE_TIMEOUT_S, interval=0.3)  # fmt: skip
        fault.recovered = self.timeline.elapsed()
        self.active = None
        self.timeline.note(f"recovered from {fault.name} on {fault.target}: {fault.line()}")

    async def pause(self) -> None:
        """Steady load between two faults, for a random while."""
        await asyncio.sleep(self.rng.uniform(*self.profile.gap_s))

    # --- the end ---------------------------------------------------------------------------------

    async def scenario_violations(self) -> list[str]:
        found: list[str] = []
        for check in self.final_checks:
            found.extend(await check())
        return found

    async def orders_expired(self) -> list[str]:
        """Each saga service forgot some finished orders during the run: their changelog holds tombstones.

        The run lasts several horizons, so an order placed early has long expired; a service that
        tombstoned none has stopped expiring (a fault broke its sweep, or pending work never ends)."""
        expired = {name: await order_tombstones(self.settings, topic) for name, topic in CHANGELOGS.items()}
        letters = [json.loads(record.value) for record in await read_topic(self.settings, DEAD_LETTER)]
        late = Counter(letter["consumer"] for letter in letters if any(r.covers(letter) for r in self.replayed))
        self.notes.append(
            f"order states expired (tombstones on the changelogs, horizon {self.profile.order_retention_s:g} s): "
            + ", ".join(f"{name} {count}" for name, count in expired.items())
            + "; rewound records of forgotten orders dead-lettered as expired: "
            + (", ".join(f"{name} {count}" for name, count in sorted(late.items())) or "none")
        )
        if self.timeline.elapsed() < 2 * self.profile.order_retention_s:
            return []  # too short a run to expect any
        return [f"{name} expired no order in a run of {self.timeline.elapsed():.0f} s"
                for name, count in expired.items() if count == 0]  # fmt: skip

    def quiet_orders(self) -> list[PlannedOrder]:
        return [planned for planned in self.orders if planned.order_id in self.quiet]

    async def report(self, started: float, found: Sequence[str]) -> str:
        timelines, _ = await audit_timelines(self.settings)
        plain = latencies(self.orders, timelines, self.sent, kinds=(PLAIN,))
        quiet = latencies(self.quiet_orders(), timelines, self.sent, kinds=(PLAIN,))
        counts = self.load.counts
        lines = [
            f"choreo fault-injection run ({self.profile.name}), seed {self.timeline.seed} "
            f"(replay with CHOREO_TEST_SEED={self.timeline.seed}), {time.monotonic() - started:.0f} s",
            f"orders: {len(self.orders)} at {self.profile.rate}/s ("
            + ", ".join(f"{kind} {counts[kind]}" for kind in (*KINDS, "barrier") if counts[kind])
            + f"); {counts['cancellations']} cancellations, {counts['decisions']} decisions, "
            f"{counts['duplicates re-published']} duplicates re-published, {len(self.poison)} poison records, "
            f"{counts['sends retried']} client sends retried",
            f"faults injected: {len(self.faults)}",
            *(f"  {fault.line()}" for fault in self.faults),
            f"invariant violations: {len(found)}",
            *(f"  {problem}" for problem in found[:40]),
            f"outcomes: {outcome_counts(self.orders, timelines)}",
            f"outcomes by kind: {outcome_summary(self.orders, timelines)}",
            f"plain orders placed→terminal: p50 {percentile(plain, 0.5):.2f} s, p99 {percentile(plain, 0.99):.2f} s, "
            f"max {max(plain, default=0.0):.2f} s; placed while no fault was active: "
            f"p50 {percentile(quiet, 0.5):.2f} s, p99 {percentile(quiet, 0.99):.2f} s",
            f"processes that exited on their own: {len(self.supervisor.exits)}",
            *(f"  {line}" for line in self.supervisor.exits),
            *self.notes,
        ]
        recovered = [fault.recovered - fault.injected for fault in self.faults if fault.recovered is not None]
        if recovered:
            lines.append(
                f"time to recover: median {statistics.median(recovered):.1f} s, max {max(recovered):.1f} s "
                f"over {len(recovered)} of {len(self.faults)} faults"
            )
        text = "\n".join(lines) + "\n"
        (self.tmp_path / "fault-report.txt").write_text(text)
        return text


def outcome_counts(orders: Sequence[PlannedOrder], timelines: dict[str, list[Envelope]]) -> str:
    tally: Counter[str] = Counter()
    for planned in orders:
        types = [envelope.type for envelope in timelines.get(planned.order_id, [])]
        ends = [t for t in types if t in TERMINALS]
        outcome = {"OrderCompleted": "completed", "OrderCancelled": "cancelled"}.get(ends[0] if ends else "", "other")
        outcome = outcome if len(ends) <= 1 else f"{len(ends)} terminal events"
        tally[outcome] += 1
    return ", ".join(f"{key} {count}" for key, count in sorted(tally.items()))


async def order_tombstones(settings: ChoreoSettings, changelog: Topic) -> int:
    """How many order states a changelog deleted (tombstoned); the sweep deletes only expired ones."""
    records = await read_topic(settings, changelog)
    return sum(1 for record in records if record.value is None and record.key.startswith(b"order:"))


async def alerts_by_subject(settings: ChoreoSettings, topic: Topic = MONITOR_ALERTS) -> dict[str, list[Envelope]]:
    found: dict[str, list[Envelope]] = {}
    for record in await read_topic(settings, topic):
        envelope = Envelope.from_bytes(record.value)
        found.setdefault(envelope.order_id, []).append(envelope)
    return found


async def monitor_get(port: int, path: str) -> dict[str, Any] | None:
    async with httpx.AsyncClient(timeout=5) as client:
        try:
            response = await client.get(f"http://127.0.0.1:{port}{path}")
        except httpx.HTTPError:
            return None
        body: dict[str, Any] = response.json() if response.status_code == 200 else {}
        return body or None


Scenario = Callable[[], Awaitable[None]]


async def inject_and_verify(
    run: FaultRun, plan: Callable[[FaultRun], Sequence[Scenario]], request: pytest.FixtureRequest, title: str
) -> None:
    """Start the run, inject every fault of `plan` once per round under the load, settle, and check everything.

    The report goes to the session's summary whatever happens, with what was broken when the run stopped.
    """
    started = time.monotonic()
    found: list[str] | None = None
    try:
        await run.start()
        for _ in range(run.profile.rounds):
            for scenario in plan(run):
                await run.pause()
                await scenario()
        await run.load.stop()
        run.timeline.note(f"load stopped after {len(run.orders)} orders")
        await settle_and_verify(run, settle_timeout=180)
        found = await run.scenario_violations()
        assert not found, f"{len(found)} violations:\n" + "\n".join(found) + f"\n{run.timeline}"
    finally:
        if found is None:  # the run stopped before its own checks: count what is broken now
            try:
                found = [*await run_violations(run), *await run.scenario_violations()]
            except Exception as error:  # the broker may be the thing that failed
                found = [f"could not read the final state: {error!r}"]
        report = await run.report(started, found)
        request.config.stash.setdefault(REPORTS, []).append(f"{title}\n{report}")
        await run.close()

"""End-to-end saga benchmark: N mixed orders through the five services running as processes.

    python -m benchmarks.saga_bench [--orders 1000]
        [--mix completed=70,rejected=10,declined=10,shipping_failed=10]
        [--rate R] [--bootstrap HOST:PORT] [--json PATH]

Starts a throwaway local broker (unless --bootstrap names one), provisions the topics under a
unique prefix, runs inventory, payment, approval, shipping and audit as subprocesses, warms them
up with one order of every outcome, then publishes the measured orders and follows the audit
topic until every order has its terminal event. Totals stay below the approval threshold, so no
reviewer is involved; the outcome comes from the order itself: an unknown SKU is rejected, the
customer `no-credit` is declined and the destination AQ is not served.

Latency is measured per order from its OrderPlaced `occurred_at` to the terminal event, twice:
to the terminal's own `occurred_at` (when the saga ended) and to the audit record carrying it
(when an observer could see it). Both sides read the same wall clock, since everything runs here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import RecordMetadata

from schemas.envelope import Envelope, Source
from schemas.events import Address, OrderCancelled, OrderCompleted, OrderLine, OrderPlaced
from schemas.topics import AUDIT, topic_of
from services.common.broker import REPO_ROOT, BrokerSettings, LocalBroker, PortInUseError
from services.common.kafka import consumer as make_consumer
from services.common.kafka import producer as make_producer
from services.common.settings import ChoreoSettings
from services.common.topics import describe_topics, ensure_topics

log = logging.getLogger("benchmarks.saga_bench")

SERVICES: tuple[str, ...] = ("audit", "shipping", "approval", "payment", "inventory")
OUTCOMES: tuple[str, ...] = ("completed", "rejected", "declined", "shipping_failed")
DEFAULT_MIX = "completed=70,rejected=10,declined=10,shipping_failed=10"
TERMINAL_TYPES = frozenset({OrderCompleted.__name__, OrderCancelled.__name__})
EXPECTED_TERMINAL = {
    "completed": OrderCompleted.__name__,
    "rejected": OrderCancelled.__name__,
    "declined": OrderCancelled.__name__,
    "shipping_failed": OrderCancelled.__name__,
}

BENCH_SKUS: tuple[str, ...] = tuple(f"BENCH-{number:02d}" for number in range(20))
UNKNOWN_SKU = "BENCH-NOT-IN-CATALOG"
STOCK_PER_SKU = 10_000_000
DECLINED_CUSTOMER = "no-credit"  # listed with a zero credit limit in the payment service's default customers file
CUSTOMERS = 200  # spread over many ledger entries, each far from the default credit limit
SERVED_COUNTRIES: tuple[str, ...] = ("FR", "DE", "US", "GB", "JP", "NL")
UNSERVED_COUNTRY = "AQ"

STOP_TIMEOUT_S = 15.0
PROGRESS_EVERY_S = 5.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- the orders --------------------------------------------------------------------------------


def parse_mix(text: str) -> dict[str, int]:
    """`completed=70,rejected=10,...` as weights; outcomes not named get weight 0."""
    weights = dict.fromkeys(OUTCOMES, 0)
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise argparse.ArgumentTypeError(f"bad mix entry {part!r}: use <outcome>=<weight>, outcomes {OUTCOMES}")
        try:
            weight = int(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"bad weight in {part!r}: not an integer") from error
        if weight < 0:
            raise argparse.ArgumentTypeError(f"bad weight in {part!r}: negative")
        weights[name] = weight
    if sum(weights.values()) == 0:
        raise argparse.ArgumentTypeError("the mix has no weight at all")
    return weights


def plan_outcomes(orders: int, mix: dict[str, int], rng: random.Random) -> list[str]:
    """Exactly proportional counts (largest remainder), in a shuffled order."""
    total = sum(mix.values())
    shares = {name: orders * weight / total for name, weight in mix.items()}
    counts = {name: math.floor(share) for name, share in shares.items()}
    by_remainder = sorted(mix, key=lambda name: shares[name] - counts[name], reverse=True)
    for name in by_remainder[: orders - sum(counts.values())]:
        counts[name] += 1
    planned = [name for name in OUTCOMES for _ in range(counts[name])]
    rng.shuffle(planned)
    return planned


def order_for(outcome: str, index: int, rng: random.Random) -> OrderPlaced:
    """An order below the approval threshold (at most 3 lines x 3 x 50.00) that ends as `outcome`."""
    lines = [
        OrderLine(sku=sku, quantity=rng.randint(1, 3), unit_price=Decimal(rng.randint(100, 5000)) / 100)
        for sku in rng.sample(BENCH_SKUS, rng.randint(1, 3))
    ]
    if outcome == "rejected":
        # Beside known SKUs, so the all-or-nothing release of the lines that were held is exercised too.
        lines[-1] = OrderLine(sku=UNKNOWN_SKU, quantity=1, unit_price=Decimal("9.99"))
    customer = DECLINED_CUSTOMER if outcome == "declined" else f"bench-customer-{index % CUSTOMERS}"
    country = UNSERVED_COUNTRY if outcome == "shipping_failed" else rng.choice(SERVED_COUNTRIES)
    return OrderPlaced(customer_id=customer, items=lines, currency="EUR", ship_to=Address(country=country))


@dataclass(frozen=True)
class PlannedOrder:
    order_id: str
    outcome: str
    event: OrderPlaced


def plan_orders(prefix: str, count: int, mix: dict[str, int], rng: random.Random) -> list[PlannedOrder]:
    return [
        PlannedOrder(f"{prefix}{index:06d}", outcome, order_for(outcome, index, rng))
        for index, outcome in enumerate(plan_outcomes(count, mix, rng))
    ]


# --- watching the audit topic ------------------------------------------------------------------


@dataclass(frozen=True)
class Terminal:
    type: str
    occurred_at: datetime
    record_ms: int


class AuditWatcher:
    """Follows the audit topic (read_committed) and keeps the first terminal event of every order."""

    def __init__(self, settings: ChoreoSettings) -> None:
        self.settings = settings
        self.terminals: dict[str, Terminal] = {}
        self.records = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        described = await describe_topics(self.settings, [AUDIT])
        if not described:
            raise RuntimeError(f"topic {self.settings.topic(AUDIT)} does not exist")
        name = self.settings.topic(AUDIT)
        partitions = [TopicPartition(name, number) for number in range(described[0].partitions)]
        consumer = make_consumer(self.settings, group_id=None, max_poll_records=2000)
        await consumer.start()
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._follow(consumer), name="audit-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self, consumer: Any) -> None:
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        self._take(record.value, record.timestamp)
                if batch:
                    self._changed.set()
        finally:
            await consumer.stop()

    def _take(self, value: bytes | None, timestamp_ms: int) -> None:
        self.records += 1
        # Only the terminal events matter here; a full envelope validation of every record
        # would spend this process's CPU, which the services compete for on a small machine.
        try:
            document = json.loads(value or b"")
        except ValueError:
            return
        if not isinstance(document, dict) or document.get("type") not in TERMINAL_TYPES:
            return
        order_id = document.get("order_id")
        if isinstance(order_id, str) and order_id not in self.terminals:
            occurred = datetime.fromisoformat(str(document["occurred_at"]).replace("Z", "+00:00"))
            self.terminals[order_id] = Terminal(str(document["type"]), occurred, timestamp_ms)

    async def wait_for(self, order_ids: Sequence[str], within_s: float, check: Callable[[], None], label: str) -> bool:
        """True once every order has its terminal; False on timeout. `check` raises if a service died."""
        deadline = time.monotonic() + within_s
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        wanted = set(order_ids)
        while True:
            done = sum(1 for order_id in wanted if order_id in self.terminals)
            if done == len(wanted):
                return True
            if self._task is not None and self._task.done():
                self._task.result()
                raise RuntimeError("the audit watcher stopped")
            check()
            now = time.monotonic()
            if now >= deadline:
                log.error("%s: %d of %d orders ended before the timeout", label, done, len(wanted))
                return False
            if now >= next_progress:
                log.info("%s: %d/%d orders ended (%d audit records read)", label, done, len(wanted), self.records)
                next_progress = now + PROGRESS_EVERY_S
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=0.5)


# --- publishing --------------------------------------------------------------------------------


async def publish_orders(
    settings: ChoreoSettings, orders: Sequence[PlannedOrder], rate: float | None
) -> dict[str, datetime]:
    """Send every order (paced at `rate` per second if given); returns each order's `occurred_at`."""
    producer = make_producer(settings)
    await producer.start()
    placed_at: dict[str, datetime] = {}
    try:
        pending: list[asyncio.Future[RecordMetadata]] = []
        started = time.monotonic()
        for number, order in enumerate(orders):
            if rate is not None:
                delay = started + number / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            # Stamped just before sending, so the latency includes the producer and the broker.
            envelope = Envelope.new(order.event, order_id=order.order_id, source=Source.CLIENT)
            placed_at[order.order_id] = envelope.occurred_at
            topic = settings.topic(topic_of(OrderPlaced))
            pending.append(await producer.send(topic, envelope.to_bytes(), key=envelope.key))
        await asyncio.gather(*pending)
        log.info("published %d orders in %.2f s", len(orders), time.monotonic() - started)
    finally:
        await producer.stop()
    return placed_at


# --- the service processes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    cpu_s: float
    rss_bytes: int
    peak_rss_bytes: int


def proc_usage(pid: int) -> Usage | None:
    """CPU (user + system) and memory of a live process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; the fields after its closing parenthesis do not.
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    memory = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            memory[key] = int(value.split()[0]) * 1024
    return Usage(cpu_s, memory.get("VmRSS", 0), memory.get("VmHWM", 0))


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def check(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"service {self.name} exited with code {code}; last log lines:\n{tail(self.log_path)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_bytes()[-16_384:].decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def service_env(settings: ChoreoSettings, catalog: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CHOREO_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "CHOREO_TOPIC_PREFIX": settings.topic_prefix,
        "CHOREO_PARTITIONS": str(settings.partitions),
        "CHOREO_ENVIRONMENT": "test",
        "CHOREO_APPROVAL_TOKEN": f"bench-{secrets.token_hex(16)}",
        "CHOREO_HEALTH_PORT": "0",
        "CHOREO_APPROVAL_HTTP_PORT": "0",
        "CHOREO_INVENTORY_CATALOG": str(catalog),
    }


def spawn_services(env: dict[str, str], logs_dir: Path) -> list[ServiceProcess]:
    logs_dir.mkdir(parents=True, exist_ok=True)
    started = []
    for name in SERVICES:
        log_path = logs_dir / f"{name}.log"
        with open(log_path, "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                env=env,
                cwd=REPO_ROOT,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        started.append(ServiceProcess(name, process, log_path))
        log.info("started %s (pid %d)", name, process.pid)
    return started


def health_port(log_path: Path) -> int | None:
    """The /health port a service picked (CHOREO_HEALTH_PORT=0), from its start-up log line."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("message") == "health endpoint listening":
                port = entry.get("port")
                return port if isinstance(port, int) else None
    return None


async def runner_counts(service: ServiceProcess) -> tuple[int, int] | None:
    """(records processed, batches committed) from the service's /health, or None if unavailable."""
    port = health_port(service.log_path)
    if port is None:
        return None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        body = json.loads(response.split(b"\r\n\r\n", 1)[1])
        return int(body["records"]), int(body["batches"])
    except (OSError, TimeoutError, ValueError, KeyError, IndexError):
        return None


def stop_services(services: Sequence[ServiceProcess]) -> None:
    for service in services:
        if service.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                service.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for service in services:
        try:
            service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for %.0f s; killing it", service.name, STOP_TIMEOUT_S)
            service.process.kill()
            service.process.wait()
    if services:
        log.info("services stopped")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def start_broker(run_dir: Path) -> tuple[LocalBroker, int]:
    for attempt in range(3):
        broker = LocalBroker(BrokerSettings(port=free_port(), run_dir=run_dir))
        try:
            result = broker.start()
        except PortInUseError:
            # Another process took the port between our probe and the broker's bind.
            log.warning("broker port taken (attempt %d); retrying on another", attempt + 1)
            continue
        log.info("broker ready at %s (pid %d, %.1f s)", result.bootstrap, result.pid, result.elapsed_s)
        return broker, result.pid
    raise RuntimeError("no free port for the broker after 3 attempts")


# --- figures -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(values)))
    return values[rank - 1]


@dataclass(frozen=True)
class LatencySummary:
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, values_s: Sequence[float]) -> LatencySummary:
        ordered = sorted(value * 1000 for value in values_s)
        mean = sum(ordered) / len(ordered) if ordered else math.nan
        return cls(
            len(ordered),
            percentile(ordered, 0.50),
            percentile(ordered, 0.95),
            percentile(ordered, 0.99),
            ordered[-1] if ordered else math.nan,
            mean,
        )


@dataclass
class ProcessFigures:
    name: str
    pid: int
    cpu_s: float
    cpu_s_measured: float
    peak_rss_mb: float
    records: int | None = None
    transactions: int | None = None


@dataclass
class Report:
    orders: int
    mix: dict[str, int]
    rate: float | None
    partitions: int
    bootstrap: str
    local_broker: bool
    ended: int = 0
    completed: int = 0
    compensated: int = 0
    unexpected_outcomes: int = 0
    wall_s: float = math.nan
    publish_s: float = math.nan
    sagas_per_s: float = math.nan
    completed_per_s: float = math.nan
    compensated_per_s: float = math.nan
    latency_to_terminal: LatencySummary | None = None
    latency_to_audit: LatencySummary | None = None
    latency_by_outcome: dict[str, LatencySummary] = field(default_factory=dict)
    processes: list[ProcessFigures] = field(default_factory=list)


def summarize(
    report: Report,
    orders: Sequence[PlannedOrder],
    placed_at: dict[str, datetime],
    terminals: dict[str, Terminal],
) -> None:
    ended = [order for order in orders if order.order_id in terminals]
    report.ended = len(ended)
    report.completed = sum(1 for order in ended if terminals[order.order_id].type == OrderCompleted.__name__)
    report.compensated = report.ended - report.completed
    report.unexpected_outcomes = sum(
        1 for order in ended if terminals[order.order_id].type != EXPECTED_TERMINAL[order.outcome]
    )
    if not ended:
        return
    first_publish = min(placed_at.values())
    last_terminal_ms = max(terminals[order.order_id].record_ms for order in ended)
    report.wall_s = last_terminal_ms / 1000 - first_publish.timestamp()
    report.publish_s = (max(placed_at.values()) - first_publish).total_seconds()
    report.sagas_per_s = report.ended / report.wall_s
    report.completed_per_s = report.completed / report.wall_s
    report.compensated_per_s = report.compensated / report.wall_s
    to_terminal = {
        order.order_id: (terminals[order.order_id].occurred_at - placed_at[order.order_id]).total_seconds()
        for order in ended
    }
    report.latency_to_terminal = LatencySummary.of(list(to_terminal.values()))
    report.latency_to_audit = LatencySummary.of(
        [terminals[order.order_id].record_ms / 1000 - placed_at[order.order_id].timestamp() for order in ended]
    )
    for outcome in OUTCOMES:
        values = [to_terminal[order.order_id] for order in ended if order.outcome == outcome]
        if values:
            report.latency_by_outcome[outcome] = LatencySummary.of(values)


def render(report: Report) -> str:
    lines = [
        "saga benchmark",
        f"  orders              {report.orders} ({', '.join(f'{k}={v}' for k, v in report.mix.items() if v)})",
        f"  rate                {'as fast as possible' if report.rate is None else f'{report.rate:g}/s'}",
        f"  partitions          {report.partitions}",
        f"  broker              {report.bootstrap} ({'local, started here' if report.local_broker else 'given'})",
        f"  ended               {report.ended}/{report.orders}"
        f" (completed {report.completed}, compensated {report.compensated},"
        f" unexpected outcome {report.unexpected_outcomes})",
        f"  publish time        {report.publish_s:.2f} s",
        f"  wall time           {report.wall_s:.2f} s (first publish -> last terminal in the audit)",
        f"  sagas/s             {report.sagas_per_s:.1f} (completed {report.completed_per_s:.1f},"
        f" compensated {report.compensated_per_s:.1f})",
        "",
        f"  {'latency (ms)':<32}{'n':>6}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}{'mean':>9}",
    ]

    def row(label: str, summary: LatencySummary | None) -> None:
        if summary is not None:
            lines.append(
                f"  {label:<32}{summary.count:>6}{summary.p50_ms:>9.0f}{summary.p95_ms:>9.0f}"
                f"{summary.p99_ms:>9.0f}{summary.max_ms:>9.0f}{summary.mean_ms:>9.0f}"
            )

    row("placed -> terminal occurred_at", report.latency_to_terminal)
    row("placed -> terminal in audit", report.latency_to_audit)
    for outcome, summary in report.latency_by_outcome.items():
        row(f"  {outcome} (to terminal)", summary)
    lines += [
        "",
        f"  {'process':<14}{'pid':>8}{'cpu s total':>13}{'cpu s measured':>16}{'peak rss MB':>13}"
        f"{'records':>9}{'txns':>7}",
    ]
    for figures in report.processes:
        records = "" if figures.records is None else str(figures.records)
        transactions = "" if figures.transactions is None else str(figures.transactions)
        lines.append(
            f"  {figures.name:<14}{figures.pid:>8}{figures.cpu_s:>13.2f}"
            f"{figures.cpu_s_measured:>16.2f}{figures.peak_rss_mb:>13.1f}{records:>9}{transactions:>7}"
        )
    lines.append("  (cpu measured, records and txns: from the first measured publish to the last terminal)")
    return "\n".join(lines) + "\n"


def finite(value: Any) -> Any:
    """`value` with NaN replaced by null, which JSON can carry."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Watched:
    """A process whose CPU is compared between the start and the end of the measured window."""

    name: str
    pid: int
    service: ServiceProcess | None = None
    at_start: Usage | None = None
    counts_at_start: tuple[int, int] | None = None


def own_usage() -> Usage:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * 1024
    current = proc_usage(os.getpid())
    return Usage(usage.ru_utime + usage.ru_stime, current.rss_bytes if current else 0, peak)


def usage_of(watched: Watched) -> Usage | None:
    return own_usage() if watched.pid == os.getpid() else proc_usage(watched.pid)


async def measure(
    settings: ChoreoSettings,
    args: argparse.Namespace,
    services: Sequence[ServiceProcess],
    watched: Sequence[Watched],
    report: Report,
) -> bool:
    rng = random.Random(args.seed)
    run = uuid.uuid4().hex[:8]
    warmup = plan_orders(f"warmup-{run}-", len(OUTCOMES), dict.fromkeys(OUTCOMES, 1), rng)
    orders = plan_orders(f"bench-{run}-", args.orders, report.mix, rng)

    def check() -> None:
        for service in services:
            service.check()

    watcher = AuditWatcher(settings)
    await watcher.start()
    try:
        log.info("warming up: one order of every outcome, until each has its terminal event")
        await publish_orders(settings, warmup, None)
        if not await watcher.wait_for([o.order_id for o in warmup], args.ready_timeout, check, "warm-up"):
            raise RuntimeError(f"the services did not finish the warm-up orders within {args.ready_timeout:.0f} s")
        for process in watched:
            process.at_start = usage_of(process)
            if process.service is not None:
                process.counts_at_start = await runner_counts(process.service)
        log.info("publishing %d orders", len(orders))
        placed_at = await publish_orders(settings, orders, args.rate)
        finished = await watcher.wait_for([o.order_id for o in orders], args.timeout, check, "measured")
        for process in watched:
            now = usage_of(process)
            if now is None:
                continue
            before = process.at_start.cpu_s if process.at_start is not None else 0.0
            figures = ProcessFigures(
                process.name, process.pid, now.cpu_s, now.cpu_s - before, now.peak_rss_bytes / 2**20
            )
            counts = await runner_counts(process.service) if process.service is not None else None
            if counts is not None and process.counts_at_start is not None:
                # Each committed batch of a task is one Kafka transaction.
                figures.records = counts[0] - process.counts_at_start[0]
                figures.transactions = counts[1] - process.counts_at_start[1]
            report.processes.append(figures)
        summarize(report, orders, placed_at, watcher.terminals)
        return finished and report.unexpected_outcomes == 0
    finally:
        await watcher.stop()


def run(args: argparse.Namespace) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="saga-bench-"))
    log.info("run dir %s", run_dir)
    broker: LocalBroker | None = None
    services: list[ServiceProcess] = []
    ok = False
    try:
        watched: list[Watched] = []
        if args.bootstrap is None:
            broker, broker_pid = start_broker(run_dir / "broker")
            bootstrap = broker.bootstrap
            watched.append(Watched("broker (jvm)", broker_pid))
        else:
            bootstrap = args.bootstrap
        settings = ChoreoSettings(
            bootstrap_servers=bootstrap,
            topic_prefix=f"bench-{uuid.uuid4().hex[:8]}.",
            partitions=args.partitions,
            environment="test",
        )
        asyncio.run(ensure_topics(settings))
        log.info("topics created with prefix %s", settings.topic_prefix)
        catalog = run_dir / "catalog.json"
        catalog.write_text(json.dumps(dict.fromkeys(BENCH_SKUS, STOCK_PER_SKU)))
        services = spawn_services(service_env(settings, catalog), run_dir / "logs")
        watched += [Watched(service.name, service.process.pid, service) for service in services]
        watched.append(Watched("benchmark", os.getpid()))
        report = Report(
            orders=args.orders,
            mix=args.mix,
            rate=args.rate,
            partitions=settings.partitions,
            bootstrap=bootstrap,
            local_broker=broker is not None,
        )
        ok = asyncio.run(measure(settings, args, services, watched, report))
        sys.stdout.write(render(report))
        sys.stdout.flush()
        if args.json is not None:
            args.json.write_text(json.dumps(finite(asdict(report)), indent=2, default=str) + "\n")
            log.info("figures written to %s", args.json)
    except KeyboardInterrupt:
        log.warning("interrupted; stopping everything")
    except Exception:
        log.exception("benchmark failed")
    finally:
        stop_services(services)
        if broker is not None:
            broker.stop()
            log.info("broker stopped")
        if args.keep_run_dir or not ok:
            log.info("kept the run dir (service logs under logs/): %s", run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if ok else 1


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than zero")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saga_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=1000, help="measured orders (default 1000)")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX), help=f"default {DEFAULT_MIX}")
    parser.add_argument("--rate", type=positive_float, default=None, help="orders per second (default: unpaced)")
    parser.add_argument("--bootstrap", default=None, metavar="HOST:PORT", help="use this broker, start none")
    parser.add_argument("--partitions", type=int, default=ChoreoSettings().partitions, help="per topic (default 6)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    parser.add_argument("--timeout", type=positive_float, default=600.0, help="seconds for the measured orders")
    parser.add_argument("--ready-timeout", type=positive_float, default=180.0, help="seconds for the warm-up")
    parser.add_argument("--seed", type=int, default=1, help="seed of the order generator")
    parser.add_argument("--keep-run-dir", action="store_true", help="keep broker data and service logs")
    args = parser.parse_args(argv)
    if args.orders < 1:
        parser.error("--orders must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    with sigterm_as_interrupt():
        return run(args)


if __name__ == "__main__":
    sys.exit(main())

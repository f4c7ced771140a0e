"""`choreo bench`: sagas per second, latency and cost, against the raw Kafka path in the same run.

    python -m benchmarks.saga_bench [--quick] [--mix completed=70,rejected=10,declined=10,shipping_failed=10]
        [--json PATH] [--png PATH] [--bootstrap HOST:PORT] [--skip-raw]

Starts a throwaway local broker (unless --bootstrap names one), provisions the topics under a
unique prefix and runs inventory, payment, approval, shipping and audit as processes. Then:

1. Sweep: the orders are offered at a rising rate, one step at a time. Each step publishes at a
   steady rate for a fixed time while the saga lag (orders placed whose terminal event has not yet
   reached the audit topic) is sampled. A step is flat when that lag does not grow (see FLAT below);
   the highest flat rate is the sustainable throughput, split into completed and compensated.
2. Latency: the orders are offered at 50% of that rate; order -> terminal event and failure event
   -> OrderCancelled percentiles.
3. Baseline: the services stop and a raw aiokafka pipeline (benchmarks.raw_pipeline: the same ten
   hops and the same message bytes, no logic, no state, no transactions) is swept the same way
   through the same broker.

Totals stay below the approval threshold, so no reviewer is involved; the outcome comes from the
order itself: an unknown SKU is rejected by inventory, the customer `no-credit` is declined by
payment and the destination AQ is not served by shipping (three compensations at three steps).

Latency is measured from the OrderPlaced `occurred_at` (stamped just before sending) to the
terminal event's own `occurred_at`; every process reads the same wall clock, as all run here.
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
import re
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message
from confluent_kafka import Consumer as ConfluentConsumer
from confluent_kafka import TopicPartition as ConfluentPartition

from benchmarks import broker_profile, profile, raw_pipeline
from benchmarks.profile import Profile
from schemas.envelope import Envelope, Source
from schemas.events import (
    Address,
    InventoryRejected,
    OrderCancelled,
    OrderCompleted,
    OrderLine,
    OrderPlaced,
    PaymentDeclined,
    ShippingFailed,
)
from schemas.topics import AUDIT, topic_of
from services.common.broker import REPO_ROOT, BrokerSettings, LocalBroker, PortInUseError
from services.common.kafka import confluent_consumer, confluent_producer
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger("benchmarks.saga_bench")

SERVICES: tuple[str, ...] = ("audit", "shipping", "approval", "payment", "inventory")
BROKER = "broker (jvm)"
# The benchmark process itself: it generates the load and watches the audit topic, so it is not the stack's cost.
LOAD_GENERATOR = "benchmark"
OUTCOMES: tuple[str, ...] = ("completed", "rejected", "declined", "shipping_failed")
DEFAULT_MIX = "completed=70,rejected=10,declined=10,shipping_failed=10"
LATENCY_LABEL = "l"
"""The first letter of the latency run's order ids (`l<step>-<run>-<number>`)."""
TERMINAL_TYPES = frozenset({OrderCompleted.__name__, OrderCancelled.__name__})
FAILURE_TYPES = frozenset({InventoryRejected.__name__, PaymentDeclined.__name__, ShippingFailed.__name__})
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

# The definition of a flat lag, printed with the results.
LAG_SAMPLE_S = 0.25
FLAT_SLOPE_OF_RATE = 0.05
FLAT_SLOPE_FLOOR = 1.0
DRAIN_TIMEOUT_S = 10.0

# The load generator's clients.
WATCH_BATCH = 5000
WATCH_IDLE_S = 0.02
# The offer wakes at most this often, so that librdkafka's batches stay full at the raw path's rates.
OFFER_TICK_S = 0.005
DELIVERY_TIMEOUT_S = 60.0
WATCHED_TYPE = re.compile("|".join(sorted(TERMINAL_TYPES | FAILURE_TYPES)).encode())
MIN_RATE = 2.0
FLAT = (
    "a step is flat when, after its first {settle:g} s, the least-squares slope of the saga lag "
    f"(orders placed without a terminal event in the observed topic, sampled every {LAG_SAMPLE_S:g} s) "
    f"is at most {FLAT_SLOPE_OF_RATE:.0%} of the offered rate per second (at least {FLAT_SLOPE_FLOOR:g}/s), "
    f"and the lag drains to zero within {DRAIN_TIMEOUT_S:g} s after publishing stops"
)


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


# --- watching the end of the pipeline ------------------------------------------------------------


@dataclass(frozen=True)
class Ended:
    type: str  # the terminal event type, or "raw" for the baseline
    end_s: float  # epoch seconds: the terminal's occurred_at, or the last hop's record timestamp
    failure_s: float | None = None  # epoch seconds of the failure event that started a compensation


def epoch_s(text: str) -> float:
    """Epoch seconds of an ISO 8601 time as events carry it (`occurred_at`, `ce_time`)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class OpenOrders:
    """The orders of a growing list not yet ended, counted again without looking twice at an ended one."""

    def __init__(self, ended: Mapping[str, Ended], order_ids: Sequence[str]) -> None:
        self._ended = ended
        self._order_ids = order_ids
        self._seen = 0
        self._open: list[str] = []

    def count(self) -> int:
        self._open.extend(self._order_ids[self._seen :])
        self._seen = len(self._order_ids)
        self._open = [order_id for order_id in self._open if order_id not in self._ended]
        return len(self._open)


class Watcher:
    """Follows one topic from its beginning and records when each order ended there."""

    def __init__(self, settings: ChoreoSettings, topic: str, *, raw: bool) -> None:
        self.settings = settings
        self.topic = topic
        self.raw = raw
        self.ended: dict[str, Ended] = {}
        self.failures: dict[str, float] = {}
        self.records = 0
        # Called once per order as it ends, so a long run can follow what is in flight without
        # scanning `ended`.
        self.on_end: Callable[[str, Ended], None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # librdkafka fetches and parses on its own threads in C: the watcher shares a small machine with the
        # stack it measures. A partition is fetched again once its records are read, as aiokafka does, not
        # prefetched: librdkafka's default sends the broker a fetch for every few records.
        consumer = confluent_consumer(self.settings, f"bench-watcher-{uuid.uuid4().hex}", **{"queued.min.messages": 1})
        # Every topic here has the settings' partition count: the registry's and the baseline's.
        consumer.assign([ConfluentPartition(self.topic, n, OFFSET_BEGINNING) for n in range(self.settings.partitions)])
        self._task = asyncio.create_task(self._follow(consumer), name=f"watch-{self.topic}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def check(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()
            raise RuntimeError(f"the watcher of {self.topic} stopped")

    async def _follow(self, consumer: ConfluentConsumer) -> None:
        try:
            while True:
                # Without waiting: what librdkafka has already fetched. The loop is the offer's too, so it is
                # yielded for a short sleep after every batch; a spin over the few records each call finds at
                # the raw path's rates would take a core.
                records = consumer.consume(WATCH_BATCH, 0)
                for record in records:
                    if record.error() is not None:
                        raise KafkaException(record.error())
                    self.records += 1
                    if self.raw:
                        order_id = (record.key() or b"").decode()
                        if order_id not in self.ended:
                            self._end(order_id, Ended("raw", record.timestamp()[1] / 1000))
                    else:
                        self._take(record.value())
                await asyncio.sleep(WATCH_IDLE_S)
        finally:
            consumer.close()

    def _take(self, value: bytes | None) -> None:
        # Only terminal and failure events matter; a full envelope validation of every record would
        # spend CPU the services compete for on a small machine, and a search of the bytes for the few
        # type names that matter spares even the parse of the others.
        if value is None or WATCHED_TYPE.search(value) is None:
            return
        try:
            document = json.loads(value)
        except ValueError:
            return
        if not isinstance(document, dict):
            return
        kind, order_id = document.get("type"), document.get("order_id")
        if not isinstance(order_id, str):
            return
        if kind in FAILURE_TYPES and order_id not in self.failures:
            self.failures[order_id] = epoch_s(str(document["occurred_at"]))
        elif kind in TERMINAL_TYPES and order_id not in self.ended:
            self._end(order_id, Ended(str(kind), epoch_s(str(document["occurred_at"])), self.failures.get(order_id)))

    def _end(self, order_id: str, ended: Ended) -> None:
        self.ended[order_id] = ended
        if self.on_end is not None:
            self.on_end(order_id, ended)

    def open(self, order_ids: Sequence[str]) -> OpenOrders:
        """The orders of `order_ids` (a list that may still grow) that have not ended yet."""
        return OpenOrders(self.ended, order_ids)

    async def wait_for(self, order_ids: Sequence[str], within_s: float, check: Callable[[], None]) -> bool:
        deadline = time.monotonic() + within_s
        still_open = self.open(order_ids)
        while still_open.count():
            self.check()
            check()
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return True


# --- offering orders -----------------------------------------------------------------------------


class Offer:
    """Publishes orders at a steady rate through one long-lived librdkafka producer.

    librdkafka sends from its own thread in C, at half the CPU a saga of aiokafka's producer here. The offer
    wakes at most every `OFFER_TICK_S` and hands over every order due by then at once: woken for each order
    in turn, librdkafka's batches (linger 1 ms) held a record or two at the raw path's 6,400 records a
    second, and the raw path's first stage and the broker spent several times more a record. In ticks, its
    batches hold what aiokafka's did, and the baseline stays what it was.
    """

    def __init__(self, settings: ChoreoSettings, topic: str, *, raw: bool) -> None:
        self.settings = settings
        self.topic = topic
        self.raw = raw
        self.producer = confluent_producer(settings, **{"linger.ms": 1, "batch.size": 512 * 1024})
        self._failed: list[KafkaError] = []

    async def start(self) -> None:
        """Nothing to start: librdkafka connects on its own thread, and a broker it cannot reach fails a delivery."""

    async def stop(self) -> None:
        await self._delivered_all()

    async def publish(
        self, orders: Sequence[PlannedOrder], rate: float | None, placed_at: dict[str, float], sent: list[str]
    ) -> None:
        """Sends `orders` (`rate` per second, or all at once); fills `placed_at` and `sent` as it goes."""
        # The baseline carries the very bytes an OrderPlaced would; building them ahead keeps the
        # publisher fast enough for the raw path's rates.
        prebuilt = (
            [Envelope.new(order.event, order_id=order.order_id, source=Source.CLIENT).to_bytes() for order in orders]
            if self.raw
            else []
        )
        started = time.monotonic()
        number = 0
        while number < len(orders):
            due = len(orders) if rate is None else min(len(orders), int((time.monotonic() - started) * rate) + 1)
            while number < due:
                order = orders[number]
                if self.raw:
                    value, placed = prebuilt[number], time.time()
                else:
                    envelope = Envelope.new(order.event, order_id=order.order_id, source=Source.CLIENT)
                    value, placed = envelope.to_bytes(), envelope.occurred_at.timestamp()
                placed_at[order.order_id] = placed
                await self._produce(value, order.order_id.encode())
                sent.append(order.order_id)
                number += 1
            self.producer.poll(0)
            self._raise_failed()
            if number < len(orders) and rate is not None:
                await asyncio.sleep(max(OFFER_TICK_S, started + number / rate - time.monotonic()))
        await self._delivered_all()

    async def _produce(self, value: bytes, key: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value, key, on_delivery=self._on_delivery)
                return
            except BufferError:
                # librdkafka's queue is full: let its thread send, and take the reports that free it.
                await asyncio.sleep(OFFER_TICK_S)
                self.producer.poll(0)

    def _on_delivery(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            self._failed.append(error)

    def _raise_failed(self) -> None:
        if self._failed:
            raise KafkaException(self._failed[0])

    async def _delivered_all(self) -> None:
        undelivered = await asyncio.to_thread(self.producer.flush, DELIVERY_TIMEOUT_S)
        self._raise_failed()
        if undelivered:
            raise RuntimeError(f"{undelivered} orders were not acknowledged within {DELIVERY_TIMEOUT_S:g} s")


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


def write_catalog(run_dir: Path) -> Path:
    """The inventory's catalog: every SKU the orders use, with stock no run can exhaust."""
    catalog = run_dir / "catalog.json"
    catalog.write_text(json.dumps(dict.fromkeys(BENCH_SKUS, STOCK_PER_SKU)))
    return catalog


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
        # Completed orders keep their charge: a long run must not spend a customer past its limit.
        "CHOREO_PAYMENT_DEFAULT_CREDIT_LIMIT": "1000000000000.00",
    }


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
    p999_ms: float
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
            percentile(ordered, 0.999),
            ordered[-1] if ordered else math.nan,
            mean,
        )


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x; 0 for fewer than two distinct x."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


@dataclass
class Step:
    offered_per_s: float
    orders: int
    achieved_per_s: float = 0.0
    completed_per_s: float = 0.0
    compensated_per_s: float = 0.0
    lag_slope_per_s: float = 0.0
    lag_max: int = 0
    drained: bool = False
    flat: bool = False
    cpu_s: dict[str, float] = field(default_factory=dict)
    lag_samples: list[tuple[float, int]] = field(default_factory=list)


@dataclass
class PathFigures:
    """One path (choreo or raw): its sweep, its sustainable rate and its latency at half of it."""

    name: str
    steps: list[Step] = field(default_factory=list)
    max_flat_per_s: float | None = None
    throughput_per_s: float | None = None
    completed_per_s: float | None = None
    compensated_per_s: float | None = None
    cpu_ms_per_saga: dict[str, float] = field(default_factory=dict)
    # The stack's whole cost: every process of the path (services or stages) and the broker, not the load generator.
    cpu_ms_per_saga_total: float | None = None
    latency_rate_per_s: float | None = None
    latency: LatencySummary | None = None
    latency_by_outcome: dict[str, LatencySummary] = field(default_factory=dict)
    compensation: LatencySummary | None = None
    unexpected_outcomes: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    compensation_ms: list[float] = field(default_factory=list)


@dataclass
class ProcessFigures:
    name: str
    pid: int
    cpu_s: float
    peak_rss_mb: float


@dataclass
class Report:
    mix: dict[str, int]
    partitions: int
    bootstrap: str
    local_broker: bool
    quick: bool
    machine: dict[str, Any]
    flat_definition: str
    choreo: PathFigures = field(default_factory=lambda: PathFigures("choreo"))
    raw: PathFigures | None = None
    choreo_over_raw: float | None = None
    processes: list[ProcessFigures] = field(default_factory=list)
    # With --profile: each service's samples by kind of work, during one more step at the flat rate.
    profile: dict[str, profile.Profile] = field(default_factory=dict)
    # And the broker's samples by request, from a JFR recording during the same step.
    broker_profile: Profile | None = None
    wall_s: float = math.nan


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "load_average_at_start": os.getloadavg()}


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def render(report: Report) -> str:
    lines = [
        "choreo bench",
        f"  machine        {report.machine.get('cpus')} cpus, {report.machine.get('cpu_model')}; load average"
        f" {' '.join(f'{x:.1f}' for x in report.machine.get('load_average_at_start', ()))} at start,"
        f" {' '.join(f'{x:.1f}' for x in report.machine.get('load_average_at_end', ()))} at end",
        f"  broker         {report.bootstrap} ({'local, started here' if report.local_broker else 'given'}),"
        f" {report.partitions} partitions per topic",
        f"  mix            {', '.join(f'{k}={v}' for k, v in report.mix.items() if v)}",
        f"  flat           {report.flat_definition}",
        "",
        f"  {'sweep':<8}{'offered/s':>11}{'achieved/s':>12}{'completed/s':>13}{'compens./s':>12}"
        f"{'lag slope/s':>13}{'lag max':>9}{'drained':>9}{'flat':>6}",
    ]
    paths = [report.choreo] + ([report.raw] if report.raw is not None else [])
    for path in paths:
        for step in path.steps:
            lines.append(
                f"  {path.name:<8}{step.offered_per_s:>11.0f}{step.achieved_per_s:>12.1f}{step.completed_per_s:>13.1f}"
                f"{step.compensated_per_s:>12.1f}{step.lag_slope_per_s:>13.1f}{step.lag_max:>9}"
                f"{'yes' if step.drained else 'no':>9}{'yes' if step.flat else 'no':>6}"
            )
    lines += ["", f"  {'throughput':<34}{'choreo':>12}{'raw':>12}"]
    raw = report.raw

    def pair(label: str, mine: float | None, theirs: float | None, spec: str = ".1f") -> None:
        lines.append(f"  {label:<34}{fmt(mine, spec):>12}{fmt(theirs, spec):>12}")

    pair("highest flat offered rate /s", report.choreo.max_flat_per_s, raw.max_flat_per_s if raw else None, ".0f")
    pair("sagas/s at that rate", report.choreo.throughput_per_s, raw.throughput_per_s if raw else None)
    pair("  completed/s", report.choreo.completed_per_s, None)
    pair("  compensated/s", report.choreo.compensated_per_s, None)
    lines.append(f"  {'choreo / raw':<34}{fmt(report.choreo_over_raw, '.1%'):>12}")
    lines += [
        "",
        f"  {'latency (ms) at 50% of flat rate':<40}{'rate/s':>8}{'n':>7}{'p50':>8}{'p95':>8}{'p99':>8}"
        f"{'p99.9':>8}{'max':>8}",
    ]

    def row(label: str, rate: float | None, summary: LatencySummary | None) -> None:
        if summary is not None:
            lines.append(
                f"  {label:<40}{fmt(rate):>8}{summary.count:>7}{fmt(summary.p50_ms):>8}{fmt(summary.p95_ms):>8}"
                f"{fmt(summary.p99_ms):>8}{fmt(summary.p999_ms):>8}{fmt(summary.max_ms):>8}"
            )

    row("choreo order -> terminal", report.choreo.latency_rate_per_s, report.choreo.latency)
    for outcome, summary in report.choreo.latency_by_outcome.items():
        row(f"  {outcome}", report.choreo.latency_rate_per_s, summary)
    row("choreo failure event -> OrderCancelled", report.choreo.latency_rate_per_s, report.choreo.compensation)
    if raw is not None:
        row("raw first hop -> tenth hop", raw.latency_rate_per_s, raw.latency)
    lines += [
        "",
        f"  {'process':<16}{'pid':>8}{'cpu s':>9}{'cpu ms/saga':>13}{'peak rss MB':>13}",
    ]
    for figures in report.processes:
        per_saga = report.choreo.cpu_ms_per_saga.get(figures.name)
        if per_saga is None and raw is not None:
            per_saga = raw.cpu_ms_per_saga.get(figures.name)
        lines.append(
            f"  {figures.name:<16}{figures.pid:>8}{figures.cpu_s:>9.1f}{fmt(per_saga, '.2f'):>13}"
            f"{figures.peak_rss_mb:>13.1f}"
        )
    for path in paths:
        lines.append(f"  {path.name + ' total':<24}{'':>9}{fmt(path.cpu_ms_per_saga_total, '.2f'):>13}")
    lines.append("  (cpu s: whole run; cpu ms/saga: during the highest flat step of its path;")
    lines.append("   total: the path's processes and the broker, without the benchmark)")
    lines.append(f"  choreo unexpected outcomes: {report.choreo.unexpected_outcomes}; wall time {report.wall_s:.0f} s")
    lines += profile.render(report.profile)
    lines += broker_profile.render(report.broker_profile)
    return "\n".join(lines) + "\n"


def finite(value: Any) -> Any:
    """`value` with NaN replaced by null, which JSON can carry."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    series = [
        ("choreo order -> terminal", report.choreo.latencies_ms),
        ("choreo failure -> OrderCancelled", report.choreo.compensation_ms),
    ]
    if report.raw is not None:
        series.append(("raw 10 hops", report.raw.latencies_ms))
    for label, values in series:
        if values:
            ordered = sorted(values)
            left.plot(ordered, [(index + 1) / len(ordered) for index in range(len(ordered))], label=label)
    left.set_xscale("log")
    left.set_xlabel("latency (ms, log scale)")
    left.set_ylabel("fraction of orders")
    left.set_title("latency at 50% of the highest flat rate (CDF)")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    top = 1.0
    for path_figures in [report.choreo] + ([report.raw] if report.raw is not None else []):
        offered = [step.offered_per_s for step in path_figures.steps]
        achieved = [step.achieved_per_s for step in path_figures.steps]
        if offered:
            right.plot(offered, achieved, marker="o", label=f"{path_figures.name} achieved")
            top = max(top, *offered)
            if path_figures.max_flat_per_s is not None:
                right.axvline(path_figures.max_flat_per_s, linestyle=":", alpha=0.5)
    right.plot([1, top], [1, top], linestyle="--", color="grey", label="achieved = offered")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("offered sagas/s")
    right.set_ylabel("terminal events/s")
    right.set_title("throughput against offered rate (dotted: highest flat rate)")
    right.grid(True, which="both", alpha=0.3)
    right.legend()
    figure.suptitle(f"choreo bench, {report.machine.get('cpus')} cpus")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Watched:
    name: str
    pid: int


def own_usage() -> Usage:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    current = proc_usage(os.getpid())
    return Usage(usage.ru_utime + usage.ru_stime, current.rss_bytes if current else 0, usage.ru_maxrss * 1024)


def usage_of(watched: Watched) -> Usage | None:
    return own_usage() if watched.pid == os.getpid() else proc_usage(watched.pid)


def cpu_snapshot(watched: Sequence[Watched]) -> dict[str, float]:
    snapshot = {}
    for process in watched:
        usage = usage_of(process)
        if usage is not None:
            snapshot[process.name] = usage.cpu_s
    return snapshot


@dataclass
class UnderTest:
    """What a sweep needs about the path under test."""

    figures: PathFigures
    offer: Offer
    watcher: Watcher
    watched: list[Watched]
    check: Callable[[], None]
    mix: dict[str, int]


def stack_cpu_ms(cpu_ms_per_saga: dict[str, float]) -> float:
    """What a saga costs the stack: every process measured but the load generator."""
    return sum(per_saga for name, per_saga in cpu_ms_per_saga.items() if name != LOAD_GENERATOR)


def half_rate(figures: PathFigures) -> float:
    """Half of the highest flat rate; without one, half of what the first step achieved."""
    if figures.max_flat_per_s is not None:
        return figures.max_flat_per_s / 2
    return max(1.0, (figures.steps[0].achieved_per_s if figures.steps else 2.0) / 2)


class Bench:
    def __init__(self, args: argparse.Namespace, report: Report) -> None:
        self.args = args
        self.report = report
        self.rng = random.Random(args.seed)
        self.run = uuid.uuid4().hex[:6]
        self.steps = 0
        self.processes: list[ServiceProcess] = []

    def final_usage(self, watched: Sequence[Watched]) -> None:
        """CPU and peak memory of processes about to stop."""
        for process in watched:
            usage = usage_of(process)
            if usage is not None:
                self.report.processes.append(
                    ProcessFigures(process.name, process.pid, usage.cpu_s, usage.peak_rss_bytes / 2**20)
                )

    def orders(self, label: str, count: int, mix: dict[str, int]) -> list[PlannedOrder]:
        self.steps += 1
        return plan_orders(f"{label}{self.steps}-{self.run}-", count, mix, self.rng)

    async def step(self, path: UnderTest, rate: float) -> Step:
        args = self.args
        orders = self.orders("s", max(1, math.ceil(rate * args.step_s)), path.mix)
        step = Step(offered_per_s=rate, orders=len(orders))
        placed: dict[str, float] = {}
        sent: list[str] = []
        cpu_before = cpu_snapshot(path.watched)
        started = time.time()
        publishing = asyncio.create_task(path.offer.publish(orders, rate, placed, sent))
        still_open = path.watcher.open(sent)
        while not publishing.done():
            await asyncio.sleep(LAG_SAMPLE_S)
            path.check()
            path.watcher.check()
            step.lag_samples.append((round(time.time() - started, 3), still_open.count()))
        publishing.result()
        cpu_after = cpu_snapshot(path.watched)
        step.cpu_s = {name: cpu_after[name] - cpu_before[name] for name in cpu_after if name in cpu_before}
        ids = [order.order_id for order in orders]
        step.drained = await path.watcher.wait_for(ids, DRAIN_TIMEOUT_S, path.check)
        window = [(t, lag) for t, lag in step.lag_samples if t >= args.settle_s]
        step.lag_slope_per_s = slope(window)
        step.lag_max = max((lag for _, lag in step.lag_samples), default=0)
        step.flat = step.drained and step.lag_slope_per_s <= max(FLAT_SLOPE_OF_RATE * rate, FLAT_SLOPE_FLOOR)
        # Throughput: terminal events that happened inside the step's measured window.
        begin, end = started + args.settle_s, started + args.step_s
        inside = [path.watcher.ended[i] for i in ids if i in path.watcher.ended]
        inside = [ended for ended in inside if begin <= ended.end_s <= end]
        span = end - begin
        step.achieved_per_s = len(inside) / span
        step.completed_per_s = sum(1 for e in inside if e.type in (OrderCompleted.__name__, "raw")) / span
        step.compensated_per_s = step.achieved_per_s - step.completed_per_s
        log.info(
            "%s %.0f/s: achieved %.1f/s, lag slope %.1f/s, max lag %d, drained %s -> %s",
            path.figures.name,
            rate,
            step.achieved_per_s,
            step.lag_slope_per_s,
            step.lag_max,
            step.drained,
            "flat" if step.flat else "not flat",
        )
        if not step.drained:
            # Let the backlog clear so the next measurement starts from an idle pipeline.
            await path.watcher.wait_for(ids, args.recover_s, path.check)
        return step

    async def sweep(self, path: UnderTest, start: float, factor: float) -> None:
        figures = path.figures
        rate, best, worst = start, None, None
        retried = False
        while rate <= self.args.max_rate:
            step = await self.step(path, rate)
            figures.steps.append(step)
            if not step.flat and not retried:
                # One growing step may be a neighbour's burst on a shared machine: measure it again.
                retried = True
                step = await self.step(path, rate)
                figures.steps.append(step)
            if not step.flat:
                worst = rate
                break
            best = step
            rate *= factor
        while best is None and rate / factor >= MIN_RATE:
            # Not even the first step was flat: step down until one is.
            rate /= factor
            step = await self.step(path, rate)
            figures.steps.append(step)
            if step.flat:
                best = step
        if best is not None and worst is not None and worst / best.offered_per_s > 1.2 and not self.args.quick:
            # One bisection between the last flat and the first growing step narrows the answer.
            middle = math.sqrt(best.offered_per_s * worst)
            step = await self.step(path, middle)
            figures.steps.append(step)
            if step.flat:
                best = step
        if best is not None:
            figures.max_flat_per_s = best.offered_per_s
            figures.throughput_per_s = best.achieved_per_s
            figures.completed_per_s = best.completed_per_s
            figures.compensated_per_s = best.compensated_per_s
            # A flat step ends all its orders at about the pace they were offered.
            figures.cpu_ms_per_saga = {name: cpu * 1000 / best.orders for name, cpu in best.cpu_s.items()}
            figures.cpu_ms_per_saga_total = stack_cpu_ms(figures.cpu_ms_per_saga)

    async def profile(self, path: UnderTest) -> None:
        """One more step at the highest flat rate, with py-spy on every service."""
        rate = path.figures.max_flat_per_s
        if rate is None:
            log.warning("no flat rate, so no profile")
            return
        pids = {process.name: process.pid for process in path.watched if process.name in SERVICES}
        log.info("profiling %s at %.0f/s into %s", ", ".join(pids), rate, self.args.profile)
        broker = next((process.pid for process in path.watched if process.name == BROKER), None)
        with contextlib.ExitStack() as recordings:
            paths = recordings.enter_context(profile.recording(pids, self.args.profile))
            jfr = recordings.enter_context(broker_profile.recording(broker, self.args.profile)) if broker else None
            await self.step(path, rate)
        self.report.profile = profile.read_profiles(paths)
        self.report.broker_profile = broker_profile.read(jfr)

    async def latency(self, path: UnderTest) -> None:
        figures = path.figures
        rate = half_rate(figures)
        figures.latency_rate_per_s = rate
        orders = self.orders(LATENCY_LABEL, max(1, math.ceil(rate * self.args.latency_s)), path.mix)
        placed: dict[str, float] = {}
        await path.offer.publish(orders, rate, placed, [])
        await path.watcher.wait_for([o.order_id for o in orders], self.args.recover_s, path.check)
        ended = {o.order_id: path.watcher.ended[o.order_id] for o in orders if o.order_id in path.watcher.ended}
        to_end = {order_id: e.end_s - placed[order_id] for order_id, e in ended.items()}
        figures.latency = LatencySummary.of(list(to_end.values()))
        figures.latencies_ms = sorted(round(value * 1000, 2) for value in to_end.values())
        if path.figures.name == "choreo":
            for outcome in OUTCOMES:
                values = [to_end[o.order_id] for o in orders if o.outcome == outcome and o.order_id in to_end]
                if values:
                    figures.latency_by_outcome[outcome] = LatencySummary.of(values)
            compensation = [e.end_s - e.failure_s for e in ended.values() if e.failure_s is not None]
            figures.compensation = LatencySummary.of(compensation)
            figures.compensation_ms = sorted(round(value * 1000, 2) for value in compensation)
            figures.unexpected_outcomes += sum(
                1 for o in orders if o.order_id in ended and ended[o.order_id].type != EXPECTED_TERMINAL[o.outcome]
            )


def spawn(name: str, argv: list[str], env: dict[str, str], logs_dir: Path) -> ServiceProcess:
    logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = logs_dir / f"{name}.log"
    # Appends: a service started again (benchmarks.soak restarts one) keeps its earlier log.
    with open(log_path, "ab") as output:
        process = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
    log.info("started %s (pid %d)", name, process.pid)
    return ServiceProcess(name, process, log_path)


def checker(processes: Sequence[ServiceProcess]) -> Callable[[], None]:
    def check() -> None:
        for process in processes:
            process.check()

    return check


async def bench_choreo(bench: Bench, settings: ChoreoSettings, run_dir: Path, watched: list[Watched]) -> None:
    args = bench.args
    await ensure_topics(settings)
    env = service_env(settings, write_catalog(run_dir))
    services = [spawn(name, [sys.executable, "-m", f"services.{name}"], env, run_dir / "logs") for name in SERVICES]
    bench.processes += services
    own = [Watched(s.name, s.process.pid) for s in services]
    watcher = Watcher(settings, settings.topic(AUDIT), raw=False)
    offer = Offer(settings, settings.topic(topic_of(OrderPlaced)), raw=False)
    path = UnderTest(bench.report.choreo, offer, watcher, watched + own, checker(services), bench.report.mix)
    warmup = bench.orders("w", len(OUTCOMES) * 2, dict.fromkeys(OUTCOMES, 1))
    # A fresh broker JVM costs several times more CPU per transaction until its JIT has compiled the
    # hot paths; a running cluster is always past that point. The raw path runs after, on a warm broker.
    try:
        await measure_path(bench, path, warmup, args.start_rate, args.factor, load_s=args.warmup_s)
    finally:
        bench.final_usage(own)
        stop_services(services)


async def measure_path(
    bench: Bench, path: UnderTest, warmup: list[PlannedOrder], start_rate: float, factor: float, *, load_s: float
) -> None:
    """Warm `path` up, sweep its rates and measure its latency; its watcher and offer are closed whatever happens."""
    await path.watcher.start()
    await path.offer.start()
    try:
        await warm_up(bench, path, warmup, start_rate, load_s=load_s)
        await bench.sweep(path, start_rate, factor)
        await bench.latency(path)
        if bench.args.profile is not None and path.figures.name == "choreo":
            await bench.profile(path)
    finally:
        await path.offer.stop()
        await path.watcher.stop()


async def warm_up(
    bench: Bench, path: UnderTest, warmup: list[PlannedOrder], start_rate: float, *, load_s: float
) -> None:
    """`warmup` through `path` all at once (it must pass them), then `load_s` seconds of orders at `start_rate`."""
    args = bench.args
    log.info("warming up %s", path.figures.name)
    await path.offer.publish(warmup, None, {}, [])
    if not await path.watcher.wait_for([o.order_id for o in warmup], args.ready_timeout, path.check):
        raise RuntimeError(f"{path.figures.name} did not pass the warm-up orders within {args.ready_timeout:.0f} s")
    if load_s > 0:
        load = bench.orders("wl", math.ceil(start_rate * load_s), path.mix)
        log.info("warming up the broker: %d orders at %.0f/s", len(load), start_rate)
        await path.offer.publish(load, start_rate, {}, [])
        await path.watcher.wait_for([o.order_id for o in load], args.recover_s, path.check)


async def bench_raw(bench: Bench, settings: ChoreoSettings, run_dir: Path, watched: list[Watched]) -> None:
    args = bench.args
    figures = PathFigures("raw")
    bench.report.raw = figures
    await raw_pipeline.create_topics(settings)
    stages = [
        spawn(
            name,
            [
                sys.executable,
                "-m",
                "benchmarks.raw_pipeline",
                settings.bootstrap_servers,
                settings.topic_prefix,
                *map(str, hops),
            ],
            dict(os.environ),
            run_dir / "logs",
        )
        for name, hops in zip(raw_pipeline.PROCESS_NAMES, raw_pipeline.PROCESSES, strict=True)
    ]
    bench.processes += stages
    own = [Watched(s.name, s.process.pid) for s in stages]
    prefix = settings.topic_prefix
    watcher = Watcher(settings, raw_pipeline.hop_topic(prefix, raw_pipeline.HOPS - 1), raw=True)
    offer = Offer(settings, raw_pipeline.hop_topic(prefix, 0), raw=True)
    path = UnderTest(figures, offer, watcher, watched + own, checker(stages), bench.report.mix)
    warmup = bench.orders("rw", 50, path.mix)
    try:
        await measure_path(bench, path, warmup, args.raw_start_rate, args.raw_factor, load_s=0)
    finally:
        bench.final_usage(own)
        stop_services(stages)


async def measure(bench: Bench, settings: ChoreoSettings, run_dir: Path, watched: list[Watched]) -> None:
    await bench_choreo(bench, settings, run_dir, watched)
    if not bench.args.skip_raw:
        await bench_raw(bench, settings, run_dir, watched)
        report = bench.report
        if report.raw is not None and report.raw.throughput_per_s and report.choreo.throughput_per_s:
            report.choreo_over_raw = report.choreo.throughput_per_s / report.raw.throughput_per_s


def run(args: argparse.Namespace) -> int:
    bench: Bench | None = None

    def measure_all(where: Throwaway) -> bool:
        nonlocal bench
        watched: list[Watched] = []
        if where.broker_pid is not None:
            watched.append(Watched(BROKER, where.broker_pid))
        watched.append(Watched(LOAD_GENERATOR, os.getpid()))
        settings = ChoreoSettings(
            bootstrap_servers=where.bootstrap,
            topic_prefix=f"bench-{uuid.uuid4().hex[:8]}.",
            partitions=args.partitions,
            environment="test",
        )
        report = Report(
            mix=args.mix,
            partitions=settings.partitions,
            bootstrap=where.bootstrap,
            local_broker=where.broker is not None,
            quick=args.quick,
            machine=machine(),
            flat_definition=FLAT.format(settle=args.settle_s),
        )
        bench = Bench(args, report)
        asyncio.run(measure(bench, settings, where.run_dir, watched))
        bench.final_usage(watched)
        report.machine["load_average_at_end"] = os.getloadavg()
        report.wall_s = time.monotonic() - where.began
        sys.stdout.write(render(report))
        sys.stdout.flush()
        write_outputs(args, report, plot)
        return report.choreo.unexpected_outcomes == 0 and report.choreo.max_flat_per_s is not None

    return run_throwaway("saga-bench", args, measure_all, lambda: bench.processes if bench is not None else [])


@dataclass(frozen=True)
class Throwaway:
    """Where one benchmark run happens: a folder of its own and a broker, started here unless one was given."""

    run_dir: Path
    bootstrap: str
    broker: LocalBroker | None
    broker_pid: int | None
    began: float  # monotonic


def run_throwaway(
    label: str,
    args: argparse.Namespace,
    measure: Callable[[Throwaway], bool],
    processes: Callable[[], Sequence[ServiceProcess]],
) -> int:
    """`measure` in a throwaway folder, with a broker of its own unless `args.bootstrap` names one.

    Whatever happens (a failure, Ctrl-C, SIGTERM), the `processes` still running and the broker
    are stopped. The folder is removed after a run `measure` calls good, kept (with the logs)
    otherwise or with `args.keep_run_dir`. The exit status: 0 for good.
    """
    run_dir = Path(tempfile.mkdtemp(prefix=f"{label}-"))
    log.info("run dir %s", run_dir)
    broker: LocalBroker | None = None
    ok = False
    began = time.monotonic()
    # Here rather than in main(): `choreo bench` and `choreo soak` call run() directly, and the
    # default action of SIGTERM would leave the services and the broker running.
    with sigterm_as_interrupt():
        try:
            if args.bootstrap is None:
                broker, broker_pid = start_broker(run_dir / "broker")
                where = Throwaway(run_dir, broker.bootstrap, broker, broker_pid, began)
            else:
                where = Throwaway(run_dir, args.bootstrap, None, None, began)
            ok = measure(where)
        except KeyboardInterrupt:
            log.warning("interrupted; stopping everything")
        except Exception:
            log.exception("%s failed", label)
        finally:
            stop_services(processes())
            if broker is not None:
                broker.stop()
                log.info("broker stopped")
            if args.keep_run_dir or not ok:
                log.info("kept the run dir (logs under logs/): %s", run_dir)
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if ok else 1


Figures = TypeVar("Figures", bound="DataclassInstance")


def write_outputs(args: argparse.Namespace, report: Figures, draw: Callable[[Figures, Path], None]) -> None:
    """`report` (a dataclass) as JSON to `args.json`, and `draw`n as a PNG to `args.png`; None skips either."""
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(finite(asdict(report)), indent=2, default=str) + "\n")
        log.info("figures written to %s", args.json)
    if args.png is not None:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        draw(report, args.png)
        log.info("plot written to %s", args.png)


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


# Full run and --quick: (step seconds, settle seconds, latency seconds, choreo factor, raw factor).
FULL = (12.0, 4.0, 20.0, 1.5, 2.0)
QUICK = (6.0, 2.0, 8.0, 2.0, 3.0)
FULL_WARMUP_S, QUICK_WARMUP_S = 60.0, 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="shorter steps, coarser sweep, no bisection (~2 min)")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX), help=f"default {DEFAULT_MIX}")
    parser.add_argument("--json", type=Path, default=Path("bench-results/bench.json"), metavar="PATH")
    parser.add_argument("--png", type=Path, default=Path("bench-results/bench.png"), metavar="PATH")
    parser.add_argument("--bootstrap", default=None, metavar="HOST:PORT", help="use this broker, start none")
    parser.add_argument("--partitions", type=int, default=ChoreoSettings().partitions, help="per topic (default 6)")
    parser.add_argument("--skip-raw", action="store_true", help="no raw aiokafka baseline")
    parser.add_argument("--start-rate", type=positive_float, default=25.0, help="first choreo step, sagas/s")
    parser.add_argument("--raw-start-rate", type=positive_float, default=100.0, help="first raw step, records/s")
    parser.add_argument("--max-rate", type=positive_float, default=20_000.0, help="the sweep stops above this")
    parser.add_argument("--step-s", type=positive_float, default=None, help="seconds per sweep step")
    parser.add_argument("--settle-s", type=float, default=None, help="seconds of a step left out of its figures")
    parser.add_argument("--latency-s", type=positive_float, default=None, help="seconds of the latency run")
    parser.add_argument("--warmup-s", type=float, default=None, help="seconds of load before the sweep")
    parser.add_argument("--recover-s", type=positive_float, default=60.0, help="wait for a backlog to clear")
    parser.add_argument("--ready-timeout", type=positive_float, default=180.0, help="seconds for the warm-up")
    parser.add_argument("--seed", type=int, default=1, help="seed of the order generator")
    parser.add_argument("--keep-run-dir", action="store_true", help="keep broker data and process logs")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="one more step at the flat rate, py-spy on every service and JFR on the broker; raw profiles go to DIR",
    )


def finish_arguments(args: argparse.Namespace) -> argparse.Namespace:
    step_s, settle_s, latency_s, factor, raw_factor = QUICK if args.quick else FULL
    args.warmup_s = (QUICK_WARMUP_S if args.quick else FULL_WARMUP_S) if args.warmup_s is None else args.warmup_s
    args.step_s = args.step_s or step_s
    args.settle_s = settle_s if args.settle_s is None else args.settle_s
    args.latency_s = args.latency_s or latency_s
    args.factor, args.raw_factor = factor, raw_factor
    if not 0 <= args.settle_s < args.step_s:
        raise SystemExit("--settle-s must be at least 0 and below --step-s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saga_bench", description=(__doc__ or "").split("\n")[0])
    add_arguments(parser)
    args = finish_arguments(parser.parse_args(argv))
    configure_logging()
    return run(args)


def configure_logging() -> None:
    """Progress on stderr; the figures go to stdout."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # A watcher starting on a topic just created asks for offsets before the leader is elected,
    # and the fetcher logs every retry as an error.
    logging.getLogger("aiokafka.consumer.fetcher").setLevel(logging.CRITICAL)


if __name__ == "__main__":
    sys.exit(main())

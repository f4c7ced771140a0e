"""Soak of the eternal monitor: many health checks at a tiny interval while sagas flow through `audit`.

    python -m benchmarks.monitor_soak [--checks 100000] [--sagas 10000] [--targets 20]
        [--interval 0.02] [--bootstrap HOST:PORT] [--json PATH]

Starts a throwaway local broker (unless --bootstrap names one) and the monitor as a process
(`python -m services.monitor`), with `--targets` health endpoints served here; two of them go down
and come back in turns, so alerts and pending records are part of the load. Synthetic sagas are
written straight to `audit` (placed, reserved, charged, completed; one in a hundred is left open
and gets flagged), as the audit service would, started in step with the checks so that they flow
for the whole run. `monitor.state` gets the fast-compaction settings
the tests use, so the cleaner works during the run.

Prints the monitor's RSS after warm-up (a tenth of the checks) and at the end, and the size of
`monitor.state`: records and bytes as a consumer reads them, and on disk for a local broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from benchmarks.broker_figures import LiveKeys, partitions_of, topic_disk_usage
from benchmarks.saga_bench import free_port, proc_usage, start_broker
from schemas.envelope import Envelope, Source
from schemas.events import (
    Address,
    InventoryReserved,
    OrderCompleted,
    OrderDetails,
    OrderLine,
    OrderPlaced,
    PaymentCharged,
    StockLine,
)
from schemas.topics import AUDIT, MONITOR_ALERTS, MONITOR_STATE
from services.common.broker import LocalBroker
from services.common.kafka import consumer as make_consumer
from services.common.kafka import producer as make_producer
from services.common.service import HealthServer
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics

log = logging.getLogger("benchmarks.monitor_soak")

FAST_COMPACTION = {
    "segment.ms": "100",
    "min.cleanable.dirty.ratio": "0.01",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "100",
}
FEED_TICK_S = 0.02
FLAP_EVERY_S = 10.0
OPEN_EVERY = 100  # one saga in this many never finishes
POLL_S = 0.5
SLA_S = 20.0


@dataclass
class Sample:
    at_s: float
    checks: int
    sagas_fed: int
    rss_mb: float


@dataclass
class Figures:
    checks: int
    sagas: int
    finished: int
    flagged: int
    alerts: int
    duration_s: float
    rss_warm_mb: float
    rss_end_mb: float
    rss_growth_pct: float
    latency: dict[str, Any]
    topic_records_warm: int
    topic_records_end: int
    topic_bytes_end: int
    topic_disk_bytes_end: int | None
    live_keys_end: int
    samples: list[Sample] = field(default_factory=list)


# --- synthetic sagas -------------------------------------------------------------------------------


def _details(customer: str) -> OrderDetails:
    return OrderDetails(
        customer_id=customer,
        items=[OrderLine(sku="SOAK-1", quantity=1, unit_price=Decimal("10.00"))],
        currency="EUR",
        ship_to=Address(country="FR"),
    )


def placement(order_id: str) -> Envelope:
    details = _details(f"C-{order_id[-2:]}")
    event = OrderPlaced(
        customer_id=details.customer_id, items=details.items, currency=details.currency, ship_to=details.ship_to
    )
    return Envelope.new(event, order_id=order_id, source=Source.CLIENT)


def next_step(last: Envelope, finish: bool) -> Envelope | None:
    """The saga's next event, built when it is due so that its occurred_at is when it is written."""
    details = _details(f"C-{last.order_id[-2:]}")
    if isinstance(last.data, OrderPlaced):
        return last.caused(InventoryReserved(order=details), Source.INVENTORY)
    if isinstance(last.data, InventoryReserved):
        return last.caused(PaymentCharged(order=details, amount=Decimal("10.00"), currency="EUR"), Source.PAYMENT)
    if isinstance(last.data, PaymentCharged) and finish:
        completed = OrderCompleted(
            customer_id=details.customer_id,
            total=Decimal("10.00"),
            currency="EUR",
            items=[StockLine(sku="SOAK-1", quantity=1)],
        )
        return last.caused(completed, Source.SHIPPING)
    return None


class Feeder:
    """Starts sagas in step with the checks, so they flow for the whole run; moves each one step per tick."""

    def __init__(self, settings: ChoreoSettings, sagas: int, checks: int) -> None:
        self.settings = settings
        self.total = sagas
        self.target_checks = checks
        self.checks_seen = 0  # updated by whoever watches the monitor
        self.started = 0
        self.finished = 0
        self.left_open = 0
        self._in_flight: list[tuple[Envelope, bool]] = []
        self._producer: AIOKafkaProducer = make_producer(settings)

    @property
    def done(self) -> bool:
        return self.started >= self.total and not self._in_flight

    async def run(self) -> None:
        await self._producer.start()
        topic = self.settings.topic(AUDIT)
        run_id = uuid.uuid4().hex[:6]
        try:
            while not self.done:
                due = min(self.total, math.ceil(self.total * (self.checks_seen + 1) / self.target_checks))
                sends = []
                still: list[tuple[Envelope, bool]] = []
                for last, finish in self._in_flight:
                    envelope = next_step(last, finish)
                    if envelope is None:
                        continue
                    sends.append(await self._producer.send(topic, envelope.to_bytes(), key=envelope.key))
                    if isinstance(envelope.data, OrderCompleted):
                        self.finished += 1
                    else:
                        still.append((envelope, finish))
                while self.started < due:
                    self.started += 1
                    finish = self.started % OPEN_EVERY != 0
                    self.left_open += 0 if finish else 1
                    envelope = placement(f"SOAK-{run_id}-{self.started:06d}")
                    sends.append(await self._producer.send(topic, envelope.to_bytes(), key=envelope.key))
                    still.append((envelope, finish))
                self._in_flight = still
                await asyncio.gather(*sends)
                await asyncio.sleep(FEED_TICK_S)
        finally:
            await self._producer.stop()


# --- health targets --------------------------------------------------------------------------------


class Targets:
    def __init__(self, count: int) -> None:
        self.servers = [HealthServer("127.0.0.1", free_port(), lambda: (True, {"status": "ok"})) for _ in range(count)]
        self.down: set[int] = set()

    def urls(self) -> dict[str, str]:
        return {f"svc-{i:02d}": f"http://127.0.0.1:{server.port}/health" for i, server in enumerate(self.servers)}

    async def start(self) -> None:
        for server in self.servers:
            await server.start()

    async def flap(self, stop: asyncio.Event) -> None:
        """Take one of the first two targets down, then bring it back, in turns."""
        turn = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FLAP_EVERY_S)
            if stop.is_set():
                break
            index = turn % 2
            if index in self.down:
                await self.servers[index].start()
                self.down.discard(index)
            else:
                await self.servers[index].stop()
                self.down.add(index)
            turn += 1

    async def stop(self) -> None:
        for index, server in enumerate(self.servers):
            if index not in self.down:
                await server.stop()


# --- measuring -------------------------------------------------------------------------------------


async def topic_size(settings: ChoreoSettings) -> tuple[int, int, int]:
    """Records, bytes (keys + values) and distinct live keys of `monitor.state`, read to its end."""
    name = settings.topic(MONITOR_STATE)
    keys = LiveKeys(settings, [name])
    await keys.start()
    try:
        await keys.catch_up()
        topic = keys.topics[name]
        return topic.records, topic.bytes, keys.count(name)
    finally:
        await keys.stop()


async def count_alerts(settings: ChoreoSettings) -> int:
    reader = make_consumer(settings, group_id=None)
    await reader.start()
    try:
        tps = await partitions_of(reader, settings.topic(MONITOR_ALERTS))
        begins = await reader.beginning_offsets(tps)
        ends = await reader.end_offsets(tps)
        return sum(ends[tp] - begins[tp] for tp in tps)
    finally:
        await reader.stop()


def disk_bytes(broker: LocalBroker | None, settings: ChoreoSettings) -> int | None:
    if broker is None:
        return None
    usage = topic_disk_usage(broker.data_dir, settings.topic_prefix).get(MONITOR_STATE.name)
    return usage.segment_bytes if usage is not None else 0


def rss_mb(pid: int) -> float:
    usage = proc_usage(pid)
    return usage.rss_bytes / 2**20 if usage else float("nan")


# --- the run ---------------------------------------------------------------------------------------


def start_monitor(settings: ChoreoSettings, args: argparse.Namespace, targets: Targets, port: int) -> Any:
    env = {
        **os.environ,
        "CHOREO_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "CHOREO_TOPIC_PREFIX": settings.topic_prefix,
        "CHOREO_PARTITIONS": str(settings.partitions),
        "CHOREO_HEALTH_PORT": str(port),
        "CHOREO_MONITOR_INTERVAL": str(args.interval),
        "CHOREO_MONITOR_SAGA_SLA": str(SLA_S),
        "CHOREO_MONITOR_TARGETS": json.dumps(targets.urls()),
        "CHOREO_LOG_LEVEL": "WARNING",
    }
    log_file = Path(tempfile.gettempdir()) / f"monitor-soak-{port}.log"
    with open(log_file, "wb") as output:
        return subprocess.Popen([sys.executable, "-m", "services.monitor"], env=env, stdout=output, stderr=output)


def stop_monitor(monitor: Any) -> None:
    monitor.terminate()
    try:
        monitor.wait(timeout=30)
    except subprocess.TimeoutExpired:
        monitor.kill()
        monitor.wait(timeout=30)


@dataclass(frozen=True)
class Run:
    settings: ChoreoSettings
    args: argparse.Namespace
    began: float


@dataclass
class Progress:
    samples: list[Sample] = field(default_factory=list)
    warm_rss: float | None = None
    warm_records: int = 0


async def soak(args: argparse.Namespace, settings: ChoreoSettings, broker: LocalBroker | None) -> Figures:
    await ensure_topics(settings, [AUDIT, MONITOR_ALERTS])
    await ensure_topics(settings, [MONITOR_STATE], config_overrides={MONITOR_STATE.name: FAST_COMPACTION})
    targets = Targets(args.targets)
    await targets.start()
    port = free_port()
    monitor = await asyncio.to_thread(start_monitor, settings, args, targets, port)
    stop_flapping = asyncio.Event()
    try:
        async with httpx.AsyncClient(timeout=10, base_url=f"http://127.0.0.1:{port}") as client:
            await _wait_ready(client, monitor)
            feeder = Feeder(settings, args.sagas, args.checks)
            began = time.monotonic()
            feeding = asyncio.create_task(feeder.run())
            flapping = asyncio.create_task(targets.flap(stop_flapping))
            progress = Progress()
            while True:
                checks, stuck = await _observe(client, Run(settings, args, began), monitor, feeder, progress)
                if feeding.done():
                    feeding.result()
                if checks >= args.checks and feeding.done() and stuck["latency"]["finished"] >= feeder.finished:
                    break
                if monitor.poll() is not None:
                    raise RuntimeError(f"the monitor exited with {monitor.returncode}")
                await asyncio.sleep(POLL_S)
            duration = time.monotonic() - began
            end_rss = rss_mb(monitor.pid)
            stop_flapping.set()
            await flapping
            records, size, live = await topic_size(settings)
            warm = progress.warm_rss or float("nan")
            return Figures(
                checks=checks,
                sagas=feeder.started,
                finished=stuck["latency"]["finished"],
                flagged=len(stuck["stuck"]),
                alerts=await count_alerts(settings),
                duration_s=round(duration, 1),
                rss_warm_mb=round(warm, 1),
                rss_end_mb=round(end_rss, 1),
                rss_growth_pct=round((end_rss - warm) / warm * 100, 1),
                latency=stuck["latency"],
                topic_records_warm=progress.warm_records,
                topic_records_end=records,
                topic_bytes_end=size,
                topic_disk_bytes_end=disk_bytes(broker, settings),
                live_keys_end=live,
                samples=progress.samples,
            )
    finally:
        stop_flapping.set()
        await asyncio.to_thread(stop_monitor, monitor)
        await targets.stop()


async def _observe(
    client: httpx.AsyncClient, run: Run, monitor: Any, feeder: Feeder, progress: Progress
) -> tuple[int, dict[str, Any]]:
    settings, args, began = run.settings, run.args, run.began
    checks: int = (await client.get("/health")).json()["checks"]
    feeder.checks_seen = checks
    elapsed = time.monotonic() - began
    progress.samples.append(Sample(round(elapsed, 1), checks, feeder.started, round(rss_mb(monitor.pid), 1)))
    log.warning(
        "%6.0f s: %7d checks, %6d sagas started, %6d finished, RSS %.1f MB",
        elapsed,
        checks,
        feeder.started,
        feeder.finished,
        progress.samples[-1].rss_mb,
    )
    if progress.warm_rss is None and checks >= args.checks // 10:
        progress.warm_rss = rss_mb(monitor.pid)
        progress.warm_records = (await topic_size(settings))[0]
        log.warning(
            "warm-up done: RSS %.1f MB, monitor.state holds %d records", progress.warm_rss, progress.warm_records
        )
    stuck: dict[str, Any] = (await client.get("/monitor/sagas/stuck")).json()
    return checks, stuck


async def _wait_ready(client: httpx.AsyncClient, monitor: Any) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if monitor.poll() is not None:
            raise RuntimeError(f"the monitor exited with {monitor.returncode} while starting")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/health")).status_code == 200:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError("the monitor did not become ready within 120 s")


def report(figures: Figures) -> str:
    disk = f"{figures.topic_disk_bytes_end / 1024:.1f} KiB on disk" if figures.topic_disk_bytes_end is not None else ""
    latency = figures.latency
    return "\n".join(
        [
            f"monitor soak: {figures.checks} checks and {figures.sagas} sagas in {figures.duration_s} s",
            f"  RSS after warm-up {figures.rss_warm_mb} MB, at the end {figures.rss_end_mb} MB "
            f"({figures.rss_growth_pct:+.1f} %)",
            f"  monitor.state: {figures.topic_records_warm} records after warm-up, {figures.topic_records_end} at "
            f"the end ({figures.topic_bytes_end / 1024:.1f} KiB read{', ' + disk if disk else ''}); "
            f"{figures.live_keys_end} live keys",
            f"  sagas finished {figures.finished}, flagged stuck {figures.flagged}; alerts on monitor.alerts "
            f"{figures.alerts}",
            f"  order-to-terminal latency p50 {latency['p50_seconds']} s, p99 {latency['p99_seconds']} s, "
            f"max {latency['max_seconds']} s",
        ]
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.monitor_soak", description=__doc__.split("\n")[0])
    parser.add_argument("--checks", type=int, default=100_000, help="health checks to run (default 100000)")
    parser.add_argument("--sagas", type=int, default=10_000, help="sagas to feed (default 10000)")
    parser.add_argument("--targets", type=int, default=20, help="health endpoints to check (default 20)")
    parser.add_argument("--interval", type=float, default=0.02, help="monitor interval in seconds (default 0.02)")
    parser.add_argument("--partitions", type=int, default=ChoreoSettings().partitions)
    parser.add_argument("--bootstrap", default=None, metavar="HOST:PORT", help="use this broker, start none")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    broker: LocalBroker | None = None
    run_dir = Path(tempfile.mkdtemp(prefix="monitor-soak-"))
    try:
        if args.bootstrap is None:
            broker, _ = start_broker(run_dir / "broker")
        bootstrap = args.bootstrap or (broker.bootstrap if broker else "")
        settings = ChoreoSettings(
            bootstrap_servers=bootstrap,
            topic_prefix=f"soak-{uuid.uuid4().hex[:8]}.",
            partitions=args.partitions,
            environment="test",
        )
        figures = asyncio.run(soak(args, settings, broker))
    finally:
        if broker is not None:
            broker.stop()
    sys.stdout.write(report(figures) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(figures), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

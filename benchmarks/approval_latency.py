"""Approval benchmark: how fast a reviewer's decision becomes ApprovalGranted, and how late timeouts fire.

    python -m benchmarks.approval_latency [--decisions 50] [--pause-s 0.2] [--timeouts 50] [--timeout-s 3]
        [--bootstrap HOST:PORT] [--partitions 6]

Starts a throwaway local broker (unless --bootstrap names one) and runs the approval service as
its real process (`python -m services.approval`: stream runner with its production one-second
tick, uvicorn on a loopback port). Charges above the threshold are published straight to
payment.events, so no other service is involved.

1. Decisions: N approvals are opened; then, one at a time, a decision is POSTed to the API and the
   benchmark waits for the order's ApprovalGranted on approval.events (read_committed). Figures:
   POST → 202, POST → ApprovalGranted emitted (its occurred_at) and POST → ApprovalGranted seen.
2. Timeouts: a second process runs with a short timeout; M charges are spread over one timeout
   length so that their deadlines fall at every phase of the tick. Lateness is ApprovalTimedOut's
   occurred_at (emitted) and its arrival (seen), each minus the approval's deadline.

Everything runs on this machine, so all timestamps come from one wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from aiokafka import TopicPartition

from schemas.envelope import Envelope, Source
from schemas.events import Address, ApprovalRequested, OrderDetails, OrderLine, PaymentCharged
from schemas.topics import APPROVAL_EVENTS
from services.common.broker import REPO_ROOT, BrokerSettings, LocalBroker, PortInUseError
from services.common.kafka import consumer as make_consumer
from services.common.publisher import publish
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics

log = logging.getLogger("benchmarks.approval_latency")

TOKEN = f"bench-{uuid.uuid4().hex}"
AMOUNT = Decimal("1500.00")


# --- figures ------------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    if not ordered:
        return math.nan
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


@dataclass(frozen=True)
class Summary:
    label: str
    values_ms: list[float]

    def row(self) -> str:
        ordered = sorted(self.values_ms)
        p50, p99 = percentile(ordered, 0.5), percentile(ordered, 0.99)
        low, high = (ordered[0], ordered[-1]) if ordered else (math.nan, math.nan)
        spread = f"min {low:8.1f}  max {high:8.1f}"
        return f"  {self.label:<42} n={len(ordered):<4} p50 {p50:8.1f} ms  p99 {p99:8.1f} ms  {spread}"


# --- the pieces ---------------------------------------------------------------------------------


class Watch:
    """Every event on approval.events, with the wall-clock time it was read."""

    def __init__(self, settings: ChoreoSettings) -> None:
        self.settings = settings
        self.seen: dict[tuple[str, str], tuple[Envelope, datetime]] = {}
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        consumer = make_consumer(self.settings, group_id=None)
        await consumer.start()
        topic = self.settings.topic(APPROVAL_EVENTS)
        partitions = [TopicPartition(topic, p) for p in range(self.settings.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._follow(consumer))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self, consumer: Any) -> None:
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=50)
                now = datetime.now(UTC)
                for records in batch.values():
                    for record in records:
                        envelope = Envelope.from_bytes(record.value)
                        self.seen.setdefault((envelope.order_id, envelope.type), (envelope, now))
                if batch:
                    self._changed.set()
        finally:
            await consumer.stop()

    async def wait(self, keys: Sequence[tuple[str, str]], within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while not all(key in self.seen for key in keys):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [key for key in keys if key not in self.seen]
                raise TimeoutError(f"{len(missing)} events never arrived, e.g. {missing[:3]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


def charge(order_id: str) -> Envelope:
    order = OrderDetails(
        customer_id=f"cust-{order_id}",
        items=[OrderLine(sku="WIDGET-1", quantity=10, unit_price=AMOUNT / 10)],
        currency="EUR",
        ship_to=Address(country="DE"),
    )
    event = PaymentCharged(order=order, amount=AMOUNT, currency="EUR")
    return Envelope.new(event, order_id=order_id, source=Source.PAYMENT)


@contextlib.asynccontextmanager
async def approval_process(settings: ChoreoSettings, timeout_s: float, logs: Path) -> AsyncIterator[str]:
    """`python -m services.approval` on a free port until the block ends; the API's base URL."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHOREO_")}
    env.update({
        "CHOREO_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "CHOREO_TOPIC_PREFIX": settings.topic_prefix,
        "CHOREO_PARTITIONS": str(settings.partitions),
        "CHOREO_ENVIRONMENT": "test",
        "CHOREO_APPROVAL_TOKEN": TOKEN,
        "CHOREO_APPROVAL_TIMEOUT": str(timeout_s),
        "CHOREO_APPROVAL_HTTP_PORT": str(free_port()),
        "CHOREO_HEALTH_PORT": "0",
    })  # fmt: skip
    base_url = f"http://127.0.0.1:{env['CHOREO_APPROVAL_HTTP_PORT']}"
    logs.parent.mkdir(parents=True, exist_ok=True)
    output = await asyncio.to_thread(open, logs, "wb")
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.approval", cwd=REPO_ROOT, env=env, stdout=output, stderr=output
        )
    finally:
        output.close()  # the child has its own copy
    try:
        async with httpx.AsyncClient(base_url=base_url) as client:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        break
                if process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the approval process did not become healthy; see {logs}")
                await asyncio.sleep(0.2)
        yield base_url
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


def fresh_settings(bootstrap: str, partitions: int) -> ChoreoSettings:
    return ChoreoSettings(
        bootstrap_servers=bootstrap,
        topic_prefix=f"bench-approval-{uuid.uuid4().hex[:8]}.",
        partitions=partitions,
        environment="test",
    )


# --- the two measurements -----------------------------------------------------------------------


async def measure_decisions(bootstrap: str, args: argparse.Namespace, run_dir: Path) -> list[Summary]:
    settings = fresh_settings(bootstrap, args.partitions)
    await ensure_topics(settings)
    watch = Watch(settings)
    await watch.start()
    try:
        async with approval_process(settings, 3600, run_dir / "decisions.log") as base_url:
            order_ids = [f"d-{index:04d}" for index in range(args.decisions)]
            await publish(settings, [charge(order_id) for order_id in order_ids])
            await watch.wait([(o, ApprovalRequested.__name__) for o in order_ids], 120)
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:
                for _ in range(600):  # the API's read model catches up with the changelog
                    if (await client.get("/approvals", params={"limit": 1})).json()["total"] >= len(order_ids):
                        break
                    await asyncio.sleep(0.1)
                answered, emitted, seen = [], [], []
                for order_id in order_ids:
                    sent = datetime.now(UTC)
                    response = await client.post(
                        f"/approvals/{order_id}/decision", json={"approved": True, "reviewer": "bench"}
                    )
                    replied = datetime.now(UTC)
                    if response.status_code != 202:
                        raise RuntimeError(f"decision refused: {response.status_code} {response.text}")
                    await watch.wait([(order_id, "ApprovalGranted")], 60)
                    granted, arrived = watch.seen[(order_id, "ApprovalGranted")]
                    answered.append(ms(replied - sent))
                    emitted.append(ms(granted.occurred_at - sent))
                    seen.append(ms(arrived - sent))
                    await asyncio.sleep(args.pause_s)  # reviewers click seconds apart, not back to back
    finally:
        await watch.stop()
    return [
        Summary("POST decision -> 202", answered),
        Summary("POST decision -> ApprovalGranted emitted", emitted),
        Summary("POST decision -> ApprovalGranted seen", seen),
    ]


async def measure_timeouts(bootstrap: str, args: argparse.Namespace, run_dir: Path) -> list[Summary]:
    settings = fresh_settings(bootstrap, args.partitions)
    await ensure_topics(settings)
    watch = Watch(settings)
    await watch.start()
    try:
        async with approval_process(settings, args.timeout_s, run_dir / "timeouts.log"):
            order_ids = [f"t-{index:04d}" for index in range(args.timeouts)]
            spacing = args.timeout_s / max(1, len(order_ids))
            for order_id in order_ids:  # deadlines spread over one timeout length: every phase of the tick
                await publish(settings, [charge(order_id)])
                await asyncio.sleep(spacing)
            await watch.wait([(o, "ApprovalTimedOut") for o in order_ids], args.timeout_s + 120)
    finally:
        await watch.stop()
    emitted, seen = [], []
    for order_id in order_ids:
        requested, _ = watch.seen[(order_id, ApprovalRequested.__name__)]
        assert isinstance(requested.data, ApprovalRequested)
        timed_out, arrived = watch.seen[(order_id, "ApprovalTimedOut")]
        emitted.append(ms(timed_out.occurred_at - requested.data.deadline))
        seen.append(ms(arrived - requested.data.deadline))
    return [
        Summary(f"deadline -> ApprovalTimedOut emitted ({args.timeout_s:g} s)", emitted),
        Summary("deadline -> ApprovalTimedOut seen", seen),
    ]


def ms(delta: Any) -> float:
    return float(delta.total_seconds() * 1000)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_broker(run_dir: Path) -> LocalBroker:
    for _attempt in range(3):
        broker = LocalBroker(BrokerSettings(port=free_port(), run_dir=run_dir))
        try:
            broker.start()
        except PortInUseError:
            continue
        return broker
    raise RuntimeError("no free port for the broker after 3 attempts")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=50)
    parser.add_argument("--pause-s", type=float, default=0.2, help="pause between two decisions")
    parser.add_argument("--timeouts", type=int, default=50)
    parser.add_argument("--timeout-s", type=float, default=3.0)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--bootstrap", help="an existing broker; default: start a throwaway local one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Fresh topics make aiokafka log a few transient leader errors; httpx logs every request.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run_dir = Path(tempfile.mkdtemp(prefix="approval-bench-"))
    broker = None
    try:
        if args.bootstrap is None:
            broker = start_broker(run_dir / "broker")
        bootstrap = args.bootstrap or broker.bootstrap  # type: ignore[union-attr]
        decisions = asyncio.run(measure_decisions(bootstrap, args, run_dir))
        timeouts = asyncio.run(measure_timeouts(bootstrap, args, run_dir))
    except Exception:
        log.exception("benchmark failed; service logs kept in %s", run_dir)
        return 1
    finally:
        if broker is not None:
            broker.stop()
    lines = ["approval latency (one approval process, production 1 s tick, loopback HTTP)", "decisions:"]
    lines += [summary.row() for summary in decisions]
    lines += ["timeouts:"] + [summary.row() for summary in timeouts]
    sys.stdout.write("\n".join(lines) + "\n")
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

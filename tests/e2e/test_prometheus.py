"""The stack's metrics as a real Prometheus server scrapes them: every service up, the counts match the orders.

Every service runs as a process on a health port of its own; a Prometheus server (Debian's
`prometheus`) scrapes each one's /metrics every second. The test places orders with known
outcomes (completed; cancelled by inventory, payment, approval timeout, shipping and the customer)
and one malformed record, then asks Prometheus's HTTP API until the counts match what it placed,
and checks each endpoint's text with `promtool check metrics`.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from schemas.deadletter import DeadLetter
from schemas.envelope import Envelope, Source
from schemas.events import OrderCancellationRequested
from schemas.topics import AUDIT, DEAD_LETTER, ORDERS
from services.audit.metrics import STEP_OF
from services.common.kafka import producer
from services.common.publisher import publish
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from tests.e2e.processes import ProcessStack, service_env
from tests.faults.harness import PinnedPortProcess
from tests.kafka_fixtures import free_port
from tests.support import eventually, read_topic
from tests.test_metrics import promtool_check
from tests.workload import ANTARCTICA, LARGE, NO_CREDIT, PLAIN, UNKNOWN_SKU, make_order, workload_env

pytestmark = pytest.mark.slow

SERVICES = ("monitor", "audit", "shipping", "approval", "payment", "inventory")
PROMETHEUS = "/usr/bin/prometheus"
COMPLETED = 4
# What each cancelled order's reason falls under on choreo_saga_cancellations_total.
CANCELLED = {
    UNKNOWN_SKU: "inventory_rejected",
    NO_CREDIT: "payment_declined",
    ANTARCTICA: "shipping_failed",
    LARGE: "approval_timed_out",  # no reviewer comes within the workload's 2 s deadline
}
MALFORMED_KEY = b"o-metrics-malformed"


@dataclass
class Prometheus:
    port: int
    process: subprocess.Popen[bytes]

    async def query(self, expression: str) -> list[tuple[dict[str, str], float]]:
        """An instant vector from /api/v1/query: (labels, value) of each series."""
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.get(f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": expression})
        answer.raise_for_status()
        body = answer.json()
        assert body["status"] == "success", body
        return [(row["metric"], float(row["value"][1])) for row in body["data"]["result"]]

    async def value(self, expression: str) -> float | None:
        """The value of a one-series expression (a `sum(...)`), None while it has no series."""
        rows = await self.query(expression)
        return rows[0][1] if rows else None

    async def reaches(self, expression: str, expected: float, timeout: float = 15) -> None:
        """Poll until `expression` has the value `expected` (a scrape that timed out leaves a gap meanwhile)."""
        await eventually(partial(self.value, expression), lambda value: value == expected, timeout=timeout)


def prometheus_config(ports: dict[str, int]) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]} for name, port in ports.items()
        ],
    }


@pytest.fixture
def prometheus_binary() -> str:
    assert shutil.which(PROMETHEUS), "Debian's prometheus is missing: bash scripts/install-system-packages.sh"
    return PROMETHEUS


@pytest.fixture
def ports() -> dict[str, int]:
    return {name: free_port() for name in SERVICES}


@pytest.fixture
def prometheus(prometheus_binary: str, ports: dict[str, int], tmp_path: Path) -> Iterator[Prometheus]:
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(ports)))
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as sink:
        process = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Prometheus(port, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture
async def stack(choreo_settings: ChoreoSettings, ports: dict[str, int], tmp_path: Path) -> AsyncIterator[ProcessStack]:
    await ensure_topics(choreo_settings)
    overrides = workload_env(tmp_path)
    stack = ProcessStack(choreo_settings, tmp_path / "logs", overrides)
    targets = {name: f"http://127.0.0.1:{port}/health" for name, port in ports.items() if name != "monitor"}
    for name in SERVICES:
        env = {**overrides.get(name, {}), "CHOREO_HEALTH_PORT": str(ports[name])}
        if name == "monitor":
            env |= {"CHOREO_MONITOR_TARGETS": json.dumps(targets), "CHOREO_MONITOR_INTERVAL": "1"}
        stack.processes.append(PinnedPortProcess(name, 1, service_env(choreo_settings, name, env), stack.log_dir))
    try:
        for process in stack.processes:
            process.start()
        await asyncio.gather(*(process.wait_healthy(60) for process in stack.processes))
        yield stack
    finally:
        stack.close()


async def _ready(prometheus: Prometheus) -> bool:
    async with httpx.AsyncClient(timeout=2) as client:
        try:
            return (await client.get(f"http://127.0.0.1:{prometheus.port}/-/ready")).status_code == 200
        except httpx.HTTPError:
            return False


async def _send_malformed(settings: ChoreoSettings) -> None:
    client: AIOKafkaProducer = producer(settings)
    await client.start()
    try:
        await client.send_and_wait(settings.topic(ORDERS), b"{not json", key=MALFORMED_KEY)
    finally:
        await client.stop()


async def test_prometheus_scrapes_every_service_and_counts_what_was_placed(
    stack: ProcessStack, prometheus: Prometheus, ports: dict[str, int], choreo_settings: ChoreoSettings
) -> None:
    await eventually(lambda: _ready(prometheus), bool, timeout=30)
    rng = random.Random(20260101)
    orders = [make_order(rng, f"o-metrics-ok-{n}", PLAIN) for n in range(COMPLETED)]
    orders += [make_order(rng, f"o-metrics-{kind}", kind) for kind in CANCELLED]
    customer = make_order(rng, "o-metrics-customer", PLAIN)
    # Cancelled before it is placed, so nothing of it can complete: shipping closes, payment voids.
    cancel = Envelope.new(
        OrderCancellationRequested(reason="customer changed their mind"),
        order_id=customer.order_id,
        source=Source.CLIENT,
    )
    await publish(choreo_settings, [cancel, customer.placed, *(planned.placed for planned in orders)])
    await _send_malformed(choreo_settings)
    cancelled = len(CANCELLED) + 1

    await prometheus.reaches('sum(choreo_saga_outcomes_total{outcome="completed"})', COMPLETED, timeout=45)
    await prometheus.reaches('sum(choreo_saga_outcomes_total{outcome="cancelled"})', cancelled, timeout=30)
    for category in [*CANCELLED.values(), "customer_request"]:
        await prometheus.reaches(f'sum(choreo_saga_cancellations_total{{reason="{category}"}})', 1)
    await prometheus.reaches('sum(choreo_saga_duration_seconds_count{outcome="completed"})', COMPLETED)
    await prometheus.reaches('sum(choreo_approval_decisions_total{decision="timed_out"})', 1)

    # The malformed record: dead-lettered once by every service reading `orders`, as the topic shows.
    letters = [
        DeadLetter.model_validate_json(record.value)
        for record in await read_topic(choreo_settings, DEAD_LETTER)
        if record.key == MALFORMED_KEY
    ]
    consumers = sorted(letter.consumer for letter in letters)
    assert "inventory" in consumers
    assert len(set(consumers)) == len(consumers)
    for consumer in consumers:
        labels = f'service="{consumer}",topic="orders"'
        await prometheus.reaches(f'sum(choreo_dead_letters_total{{{labels},reason="json"}})', 1)
        await prometheus.reaches(f'sum(choreo_records_processed_total{{{labels},outcome="dead_lettered"}})', 1)
    await eventually(
        partial(prometheus.value, 'sum(choreo_records_processed_total{outcome="handled"})'),
        lambda handled: handled is not None and handled > 0,
    )

    # The audit counts each event it wrote once: as many as the audit topic holds.
    audited = [Envelope.from_bytes(record.value) for record in await read_topic(choreo_settings, AUDIT)]
    await prometheus.reaches("sum(choreo_saga_events_total)", len(audited))
    types = Counter(envelope.type for envelope in audited)
    assert types["OrderPlaced"] == len(orders) + 1
    # Whether the customer's order is voided or refunded depends on which reaches payment first.
    for event_type, step in STEP_OF.items():
        await prometheus.reaches(f'sum(choreo_saga_compensations_total{{step="{step}"}})', types[event_type])
    assert types["PaymentVoided"] + types["PaymentRefunded"] >= 3  # shipping failed, timed out, the customer

    # Every service is up, has caught up with its inputs, and its /metrics passes promtool.
    await eventually(
        partial(prometheus.query, "up"),
        lambda rows: {row["job"]: value for row, value in rows} == dict.fromkeys(SERVICES, 1.0),
    )
    lag = await eventually(
        lambda: prometheus.query("choreo_consumer_lag_records"),
        lambda rows: bool(rows) and all(value == 0 for _, value in rows),
        timeout=15,
    )
    assert {row["service"] for row, _ in lag} == set(SERVICES) - {"monitor"}
    await eventually(
        partial(prometheus.value, "sum(choreo_monitor_checks_total)"), lambda checks: checks is not None and checks > 0
    )
    async with httpx.AsyncClient(timeout=5) as client:
        for name, port in ports.items():
            answer = await client.get(f"http://127.0.0.1:{port}/metrics")
            assert answer.status_code == 200, name
            promtool_check(answer.content)
    stack.check_alive()

"""Running the monitor against the test's broker: in-process or as a process, with health servers to stop."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer

from schemas.envelope import Envelope
from schemas.topics import AUDIT, MONITOR_ALERTS
from services.common.kafka import producer
from services.common.service import HealthServer
from services.common.settings import ChoreoSettings
from services.monitor.app import Monitor, build_app
from services.monitor.runner import start, stop
from services.monitor.settings import MonitorSettings
from tests.kafka_fixtures import free_port
from tests.support import eventually, read_topic


def monitor_settings(base: ChoreoSettings, **overrides: Any) -> MonitorSettings:
    return MonitorSettings(
        bootstrap_servers=base.bootstrap_servers,
        topic_prefix=base.topic_prefix,
        partitions=base.partitions,
        environment="test",
        health_port=free_port(),
        **overrides,
    )


class ControlledService:
    """A /health endpoint on a fixed port that the test stops and starts like a real service."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/health"
        self._server: HealthServer | None = None

    async def start(self) -> None:
        self._server = HealthServer("127.0.0.1", self.port, lambda: (True, {"status": "ok"}))
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None


class MonitorClient:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        async with httpx.AsyncClient(timeout=5) as client:
            try:
                response = await client.get(self.base + path)
            except httpx.HTTPError:
                return 0, {}
            return response.status_code, response.json()

    async def health(self) -> dict[str, Any]:
        return (await self.get("/health"))[1]

    async def services(self) -> dict[str, dict[str, Any]]:
        _, body = await self.get("/monitor/services")
        return {row["service"]: row for row in body.get("services", [])}

    async def stuck(self) -> dict[str, Any]:
        return (await self.get("/monitor/sagas/stuck"))[1]

    async def wait_ready(self, timeout: float = 60.0) -> None:
        await eventually(lambda: self.get("/health"), lambda answer: answer[0] == 200, timeout=timeout)


@asynccontextmanager
async def running_monitor(settings: MonitorSettings) -> AsyncIterator[tuple[Monitor, MonitorClient]]:
    monitor = build_app(settings)
    await start(monitor)
    try:
        client = MonitorClient(monitor.port)
        await client.wait_ready()
        yield monitor, client
    finally:
        await stop(monitor)


async def publish_audit(settings: ChoreoSettings, envelopes: Sequence[Envelope], *, by_partition: bool = False) -> None:
    """As the audit service would: keyed by order, so an order's events stay in order on one partition.

    `by_partition` puts the n-th envelope on partition n instead, to reach every partition.
    """
    sender = producer(settings)
    await sender.start()
    try:
        for index, envelope in enumerate(envelopes):
            partition = index if by_partition else None
            await sender.send_and_wait(
                settings.topic(AUDIT), envelope.to_bytes(), key=envelope.key, partition=partition
            )
    finally:
        await sender.stop()


@asynccontextmanager
async def audit_writer(settings: ChoreoSettings, name: str) -> AsyncIterator[AIOKafkaProducer]:
    """A transactional producer, as the audit service writes `audit`."""
    writer = producer(settings, transactional_id=f"{settings.topic_prefix}{name}")
    await writer.start()
    try:
        yield writer
    finally:
        await writer.stop()


async def write_aborted(writer: AIOKafkaProducer, settings: ChoreoSettings, envelope: Envelope, partition: int) -> None:
    """`envelope` on `audit` in a transaction that is aborted: a read_committed consumer never sees it."""
    await writer.begin_transaction()
    await writer.send_and_wait(settings.topic(AUDIT), envelope.to_bytes(), key=envelope.key, partition=partition)
    await writer.abort_transaction()


async def alerts(settings: ChoreoSettings) -> list[Envelope]:
    return [Envelope.from_bytes(record.value) for record in await read_topic(settings, MONITOR_ALERTS)]


class MonitorProcess:
    """`python -m services.monitor` with the test's settings; its JSON log lines are kept for inspection."""

    def __init__(self, settings: MonitorSettings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            "CHOREO_BOOTSTRAP_SERVERS": s.bootstrap_servers,
            "CHOREO_TOPIC_PREFIX": s.topic_prefix,
            "CHOREO_PARTITIONS": str(s.partitions),
            "CHOREO_ENVIRONMENT": s.environment,
            "CHOREO_HEALTH_PORT": str(s.health_port),
            "CHOREO_MONITOR_INTERVAL": str(s.monitor_interval),
            "CHOREO_MONITOR_SAGA_SLA": str(s.monitor_saga_sla),
            "CHOREO_MONITOR_TARGETS": json.dumps(s.monitor_targets),
            "CHOREO_LOG_LEVEL": "INFO",
        }

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.monitor"], env=self.env(), stdout=log_file, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()  # SIGKILL: no shutdown code runs
            self.process.wait(timeout=30)
            self.process = None

    def terminate(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
            self.process = None

    def log_entries(self, message: str) -> list[dict[str, Any]]:
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("message") == message:
                entries.append(entry)
        return entries


async def until(condition: Any, timeout: float, interval: float = 0.05) -> None:
    """Poll a synchronous or asynchronous predicate until it holds; fail after `timeout`."""

    async def probe() -> bool:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        return bool(result)

    await eventually(probe, lambda ok: ok, timeout=timeout, interval=interval)

"""Running a stateful service as a process: logging, signals, the transactional loop, /health and /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from opentelemetry.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.registry import Collector

from services.common.garbage import tune_collector
from services.common.logs import configure_logging
from services.common.loop import run
from services.common.metrics import HasMetrics, RunnerMetrics, exposition, process_registry
from services.common.processor import StreamApp, TransactionalRunner
from services.common.settings import ChoreoSettings
from services.common.tracing import process_tracing

log = logging.getLogger(__name__)


class HealthServer:
    """GET /health: 200 while the service owns its partitions and runs, 503 otherwise; GET /metrics:
    `metrics` in Prometheus's text format (404 when the server has none)."""

    def __init__(
        self,
        host: str,
        port: int,
        report: Callable[[], tuple[bool, dict[str, Any]]],
        metrics: CollectorRegistry | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._report = report
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._answer, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode(errors="replace").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 and parts[0] == "GET" else None
            content_type = "application/json"
            if path == "/health":
                healthy, body = self._report()
                status = "200 OK" if healthy else "503 Service Unavailable"
                payload = json.dumps(body).encode()
            elif path == "/metrics" and self._metrics is not None:
                status, content_type, payload = "200 OK", CONTENT_TYPE_LATEST, exposition(self._metrics)
            else:
                served = "GET /health and GET /metrics are" if self._metrics is not None else "only GET /health is"
                status, payload = "404 Not Found", json.dumps({"detail": f"{served} served here"}).encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError) as error:
            log.debug("health request dropped: %r", error)
        finally:
            writer.close()


def runner_report(runner: TransactionalRunner) -> Callable[[], tuple[bool, dict[str, Any]]]:
    def report() -> tuple[bool, dict[str, Any]]:
        body = {
            "service": runner.app.name,
            "status": "ok" if runner.ready else "starting",
            "partitions": runner.partitions,
            # Which transaction coordinator serves this instance follows from it (and an operator can look it up).
            "transactional_id": runner.transactional_id,
            "records": runner.stats.records,
            "reads": runner.stats.reads,
            "batches": runner.stats.batches,
            "restored_records": runner.stats.restored_records,
            "restore_seconds": round(runner.stats.restore_seconds, 3),
            "full_restores": runner.stats.full_restores,
            "expired_keys": runner.stats.expired_keys,
            "heap_trims": runner.heap.trims,
            "heap_trim_seconds": round(runner.heap.seconds, 3),
        }
        memory = runner.rocks_memory
        if memory is not None:
            body |= {"rocksdb_memory_bytes": memory.in_use(), "rocksdb_memory_limit_bytes": memory.limit_bytes}
        return runner.ready, body

    return report


async def serve(
    settings: ChoreoSettings,
    app: StreamApp,
    *,
    also: Callable[[TransactionalRunner], Coroutine[Any, Any, None]] | None = None,
    tracer_provider: TracerProvider | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """Run `app` until SIGTERM or SIGINT; `also` runs beside it (for example an HTTP API).

    `registry` (a fresh one by default) is the process's: the runner's metrics, the app's own and
    the process's CPU and memory go there, and /metrics serves it.
    """
    registry = registry if registry is not None else process_registry()
    metrics = RunnerMetrics(app.name, registry)
    for collector in app_collectors(app):
        registry.register(collector)
    runner = TransactionalRunner(settings, app, tracer_provider=tracer_provider, metrics=metrics)
    health = HealthServer(settings.health_host, settings.health_port, runner_report(runner), registry)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, runner.stop)
    port = await health.start()
    log.info("health endpoint listening", extra={"service": app.name, "port": port})
    try:
        work = [asyncio.create_task(runner.run())]
        if also is not None:
            work.append(asyncio.create_task(also(runner)))
        done, pending = await asyncio.wait(work, return_when=asyncio.FIRST_COMPLETED)
        runner.stop()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # re-raise a crash so the process exits non-zero
    finally:
        await health.stop()


def app_collectors(app: StreamApp) -> list[Collector]:
    """The app's own metrics, if it has any."""
    return list(app.collectors()) if isinstance(app, HasMetrics) else []


Settings = TypeVar("Settings", bound=ChoreoSettings)


def main(settings: Settings, app_factory: Callable[[Settings], StreamApp]) -> None:
    """Process entry point shared by the services' `__main__` modules."""
    configure_logging(settings.log_level)
    app = app_factory(settings)
    tune_collector(settings.gc_young_threshold)
    with process_tracing(app.name) as tracer_provider:
        run(serve(settings, app, tracer_provider=tracer_provider), settings.event_loop)

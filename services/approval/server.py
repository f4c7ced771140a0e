"""The approval process: the stream runner and the reviewer API (uvicorn) in one asyncio loop.

SIGTERM or SIGINT stops the stream runner (its in-flight batch commits first); the common `serve`
then cancels the API, which stops accepting connections, finishes the requests in flight and
closes its Kafka clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import uvicorn
from opentelemetry.trace import TracerProvider

from services.approval.api import create_api
from services.approval.app import build_app
from services.approval.metrics import PendingApprovals
from services.approval.publisher import KafkaDecisionPublisher
from services.approval.readmodel import ApprovalsView, ChangelogTail
from services.approval.settings import ApprovalSettings
from services.common.garbage import tune_collector
from services.common.logs import configure_logging
from services.common.loop import run
from services.common.processor import TransactionalRunner
from services.common.service import runner_report, serve
from services.common.tracing import process_tracing

log = logging.getLogger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.up.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The process's signal handlers belong to the stream runner, which stops this server in turn.
        yield


class ReviewerApi:
    """The API with its read model and publisher; `start()` connects them, `serve()` listens until cancelled."""

    def __init__(
        self,
        settings: ApprovalSettings,
        *,
        clock: Callable[[], datetime] = utc_now,
        stream: Callable[[], tuple[bool, Mapping[str, Any]]] | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.view = ApprovalsView()
        self.tail = ChangelogTail(settings, self.view)
        self.publisher = KafkaDecisionPublisher(settings)
        self._stream = stream
        self.app = create_api(
            settings, self.view, self.publisher, clock, readiness=self._readiness, tracer_provider=tracer_provider
        )
        self.port: int | None = None
        self.listening = asyncio.Event()

    async def start(self) -> None:
        await self.publisher.start()
        try:
            await self.tail.start()
        except BaseException:
            await self.publisher.stop()
            raise

    async def stop(self) -> None:
        await self.tail.stop()
        await self.publisher.stop()

    async def serve(self, host: str, port: int) -> None:
        """Listen on host:port (0 picks a free port, see `self.port`) until cancelled, then shut down gracefully."""
        sock = _bind(host, port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_config=None, lifespan="off", access_log=False, timeout_graceful_shutdown=5
        )
        server = _Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="reviewer-api")
        up = asyncio.create_task(server.up.wait())
        try:
            await asyncio.wait([serving, up], return_when=asyncio.FIRST_COMPLETED)
            if server.started:
                self.listening.set()
                log.info("reviewer API listening", extra={"host": host, "port": self.port})
            await asyncio.shield(serving)
        except asyncio.CancelledError:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await serving
            raise
        finally:
            up.cancel()
            sock.close()
        # Only cancellation ends the API in a running service; anything else must not go unnoticed.
        raise RuntimeError("the reviewer API stopped on its own")

    def _readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {
            "publisher": {"ready": self.publisher.ready},
            "changelog": {"reading": self.tail.running, "partitions": self.tail.partitions},
        }
        ready = self.publisher.ready and self.tail.running
        if self._stream is not None:
            stream_ready, stream = self._stream()
            checks["stream"] = dict(stream)
            ready = ready and stream_ready
        return ready, checks


def _bind(host: str, port: int) -> socket.socket:
    # Bound here rather than by uvicorn, which exits the whole process when the port is taken.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def reviewer_api(
    settings: ApprovalSettings, tracer_provider: TracerProvider | None = None
) -> Callable[[TransactionalRunner], Coroutine[Any, Any, None]]:
    """The API as `serve(..., also=...)` runs it beside the stream runner, its /health including the runner's."""

    async def beside(runner: TransactionalRunner) -> None:
        api = ReviewerApi(settings, stream=runner_report(runner), tracer_provider=tracer_provider)
        # Served on the process's /metrics beside the stream runner's own.
        pending = PendingApprovals(api.view.pending_count)
        runner.metrics.registry.register(pending)
        await api.start()
        try:
            await api.serve(settings.approval_http_host, settings.approval_http_port)
        finally:
            await api.stop()
            runner.metrics.registry.unregister(pending)

    return beside


def main() -> None:
    settings = ApprovalSettings()
    configure_logging(settings.log_level)
    app = build_app(settings)
    tune_collector(settings.gc_young_threshold)
    with process_tracing(app.name) as tracer_provider:
        api = reviewer_api(settings, tracer_provider)
        run(serve(settings, app, also=api, tracer_provider=tracer_provider), settings.event_loop)

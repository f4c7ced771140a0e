"""Running the monitor: provision its topics, start the faust app, stop it on a signal or a crash."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from opentelemetry.trace import TracerProvider

from schemas.topics import AUDIT, MONITOR_ALERTS, MONITOR_STATE
from services.common.logs import configure_logging
from services.common.loop import run
from services.common.topics import ensure_topics
from services.common.tracing import process_tracing
from services.monitor.app import Monitor, build_app
from services.monitor.settings import MonitorSettings

log = logging.getLogger(__name__)

TOPICS = (AUDIT, MONITOR_ALERTS, MONITOR_STATE)
CRASH_POLL_S = 0.5


async def start(monitor: Monitor) -> None:
    await ensure_topics(monitor.settings, TOPICS)
    await monitor.app.start()
    log.info("monitor started", extra={"port": monitor.port, "group": monitor.app.conf.id})


async def stop(monitor: Monitor) -> None:
    try:
        await monitor.app.stop()
    finally:
        await monitor.close()


async def serve(monitor: Monitor, stopping: asyncio.Event) -> None:
    """Run until `stopping` is set; raise if faust crashed meanwhile."""
    await start(monitor)
    try:
        while not stopping.is_set():
            if monitor.app.crashed:
                raise RuntimeError(f"monitor crashed: {monitor.app.crash_reason!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), CRASH_POLL_S)
    finally:
        await stop(monitor)


async def _main(settings: MonitorSettings, tracer_provider: TracerProvider) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await serve(build_app(settings, tracer_provider), stopping)


def main(settings: MonitorSettings | None = None) -> None:
    settings = settings or MonitorSettings()
    configure_logging(settings.log_level)
    # One line per health request, and one per timer tick that outlasts a sub-second interval: noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("mode.timers").setLevel(logging.ERROR)
    try:
        with process_tracing("monitor") as tracer_provider:
            run(_main(settings, tracer_provider), settings.event_loop)
    except RuntimeError:
        log.exception("monitor stopped on a crash")
        sys.exit(1)

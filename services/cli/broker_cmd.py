"""``broker fetch|start|status|stop``: the local single-node Kafka broker from the command line.

Like every ``choreo`` command, each subcommand stores ``handler(args, settings)``
in the parsed namespace and it returns the process exit code. The broker reads
its own ``CHOREO_BROKER_*`` settings, not the clients' ``ChoreoSettings``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from services.common.broker import BrokerError, BrokerSettings, LocalBroker
from services.common.settings import ChoreoSettings

logger = logging.getLogger(__name__)


def add_broker_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``broker fetch|start|status|stop`` under ``subparsers``."""
    broker = subparsers.add_parser(
        "broker",
        help="run a local single-node Kafka broker (no Docker)",
        description=(
            "Run Apache Kafka in KRaft mode from Maven artifacts. Settings come from "
            "CHOREO_BROKER_PORT, CHOREO_BROKER_CONTROLLER_PORT, CHOREO_BROKER_RUN_DIR "
            "and CHOREO_BROKER_HEAP."
        ),
    )
    commands = broker.add_subparsers(dest="broker_command", metavar="COMMAND", required=True)

    fetch = commands.add_parser("fetch", help="download the Kafka jars through Maven (no-op when cached)")
    fetch.set_defaults(handler=_fetch)

    start = commands.add_parser("start", help="start the broker; wait until it answers")
    start.add_argument("--port", type=int, help="client port (default: CHOREO_BROKER_PORT or 9092)")
    start.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the broker to answer once launched (default: %(default)s)",
    )
    start.set_defaults(handler=_start)

    status = commands.add_parser("status", help="show the broker's state; exit 1 if not running")
    status.set_defaults(handler=_status)

    stop = commands.add_parser("stop", help="shut the broker down cleanly")
    stop.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for a clean shutdown before SIGKILL (default: %(default)s)",
    )
    stop.set_defaults(handler=_stop)


def _broker(args: argparse.Namespace) -> LocalBroker:
    port: int | None = getattr(args, "port", None)
    settings = BrokerSettings() if port is None else BrokerSettings(port=port)
    return LocalBroker(settings)


def _fetch(args: argparse.Namespace, _settings: ChoreoSettings) -> int:
    broker = _broker(args)
    try:
        jars = broker.resolve_classpath()
    except BrokerError as exc:
        logger.error("could not fetch the Kafka jars: %s", exc)
        return 1
    sys.stdout.write(f"{len(jars)} jars ready (classpath: {broker.classpath_file})" + "\n")
    return 0


def _start(args: argparse.Namespace, _settings: ChoreoSettings) -> int:
    broker = _broker(args)
    try:
        result = broker.start(timeout=args.timeout)
    except BrokerError as exc:
        logger.error("could not start the Kafka broker: %s", exc)
        return 1
    if result.already_running:
        sys.stdout.write(f"already running at {result.bootstrap} (pid {result.pid})" + "\n")
    else:
        sys.stdout.write(f"ready at {result.bootstrap} (pid {result.pid}) in {result.elapsed_s:.1f}s" + "\n")
    return 0


def _status(args: argparse.Namespace, _settings: ChoreoSettings) -> int:
    status = _broker(args).status()
    if not status.running:
        sys.stdout.write(f"not running (bootstrap {status.bootstrap})" + "\n")
        return 1
    rss = f"{status.rss_bytes / 2**20:.0f} MiB" if status.rss_bytes is not None else "unknown"
    ready = "ready" if status.ready else "NOT answering admin requests"
    sys.stdout.write(f"running, {ready}: pid {status.pid}, bootstrap {status.bootstrap}, rss {rss}" + "\n")
    return 0


def _stop(args: argparse.Namespace, _settings: ChoreoSettings) -> int:
    try:
        stopped = _broker(args).stop(timeout=args.timeout)
    except BrokerError as exc:
        logger.error("could not stop the Kafka broker: %s", exc)
        return 1
    sys.stdout.write(("stopped" if stopped else "not running") + "\n")
    return 0

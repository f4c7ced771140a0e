"""``broker fetch|start|status|stop``: the local Kafka broker, or cluster, from the command line.

Like every ``choreo`` command, each subcommand stores ``handler(args, settings)``
in the parsed namespace and it returns the process exit code. The broker reads
its own ``CHOREO_BROKER_*`` settings, not the clients' ``ChoreoSettings``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from services.common.broker import BrokerError, BrokerSettings, LocalCluster
from services.common.settings import ChoreoSettings

logger = logging.getLogger(__name__)


def add_broker_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``broker fetch|start|status|stop`` under ``subparsers``."""
    broker = subparsers.add_parser(
        "broker",
        help="run a local Kafka broker or cluster (no Docker)",
        description=(
            "Run Apache Kafka in KRaft mode from Maven artifacts. Settings come from "
            "CHOREO_BROKER_PORT, CHOREO_BROKER_CONTROLLER_PORT, CHOREO_BROKER_RUN_DIR, "
            "CHOREO_BROKER_HEAP and CHOREO_BROKER_NODES."
        ),
    )
    commands = broker.add_subparsers(dest="broker_command", metavar="COMMAND", required=True)

    fetch = commands.add_parser("fetch", help="download the Kafka jars through Maven (no-op when cached)")
    fetch.set_defaults(handler=_fetch)

    start = commands.add_parser("start", help="start the broker; wait until it answers")
    start.add_argument("--port", type=int, help="client port (default: CHOREO_BROKER_PORT or 9092)")
    start.add_argument(
        "--nodes",
        type=int,
        help="nodes of the cluster, each a broker and a controller on ports port, port+1, ... (default: 1)",
    )
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


def _broker(args: argparse.Namespace) -> LocalCluster:
    overrides = {name: value for name in ("port", "nodes") if (value := getattr(args, name, None)) is not None}
    return LocalCluster(BrokerSettings(**overrides))


def _fetch(args: argparse.Namespace, _settings: ChoreoSettings) -> int:
    broker = _broker(args)
    try:
        jars = broker.nodes[0].resolve_classpath()
    except BrokerError as exc:
        logger.error("could not fetch the Kafka jars: %s", exc)
        return 1
    sys.stdout.write(f"{len(jars)} jars ready (classpath: {broker.nodes[0].classpath_file})" + "\n")
    return 0


def _start(args: argparse.Namespace, _settings: ChoreoSettings) -> int:
    broker = _broker(args)
    try:
        result = broker.start(timeout=args.timeout)
    except BrokerError as exc:
        logger.error("could not start the Kafka broker: %s", exc)
        return 1
    pids = ", ".join(map(str, result.pids))
    if result.already_running:
        sys.stdout.write(f"already running at {result.bootstrap} (pid {pids})" + "\n")
    else:
        sys.stdout.write(f"ready at {result.bootstrap} (pid {pids}) in {result.elapsed_s:.1f}s" + "\n")
    return 0


def _status(args: argparse.Namespace, _settings: ChoreoSettings) -> int:
    """One line per node, then the cluster's controller and under-replicated partitions; 1 unless all are up."""
    status = _broker(args).status()
    if not status.running:
        sys.stdout.write(f"not running (bootstrap {_broker(args).bootstrap})" + "\n")
        return 1
    for node in status.nodes:
        rss = f"{node.rss_bytes / 2**20:.0f} MiB" if node.rss_bytes is not None else "-"
        state = "up" if node.up else ("down" if node.pid is None else "NOT answering")
        sys.stdout.write(f"node {node.node_id}: {state}, pid {node.pid or '-'}, {node.bootstrap}, rss {rss}" + "\n")
    controller = status.controller_id if status.controller_id is not None else "unknown"
    under = status.under_replicated if status.under_replicated is not None else "unknown"
    sys.stdout.write(f"active controller: node {controller}; under-replicated partitions: {under}" + "\n")
    return 0 if all(node.up for node in status.nodes) else 1


def _stop(args: argparse.Namespace, _settings: ChoreoSettings) -> int:
    try:
        stopped = _broker(args).stop(timeout=args.timeout)
    except BrokerError as exc:
        logger.error("could not stop the Kafka broker: %s", exc)
        return 1
    sys.stdout.write(("stopped" if stopped else "not running") + "\n")
    return 0

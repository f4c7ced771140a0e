"""`choreo run`, `choreo up --detach`, `choreo down`: the whole stack on this machine."""

from __future__ import annotations

import argparse
import sys

from services.common.broker import BrokerSettings
from services.common.settings import ChoreoSettings
from services.common.stack import down, run_foreground, up_detached


def add_stack_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    external = "use the broker CHOREO_BOOTSTRAP_SERVERS names instead of starting the local one"
    run = subparsers.add_parser("run", help="broker, topics and every service in the foreground; Ctrl-C stops all")
    run.add_argument("--external-broker", action="store_true", help=external)
    run.set_defaults(handler=_run)
    up = subparsers.add_parser("up", help="start the stack in the background (logs under .run/logs)")
    up.add_argument("--detach", "-d", action="store_true", required=True, help="run in the background")
    up.add_argument("--external-broker", action="store_true", help=external)
    up.set_defaults(handler=_up)
    stop = subparsers.add_parser("down", help="stop what `choreo up --detach` started, broker included")
    stop.add_argument("--keep-broker", action="store_true", help="leave the broker running")
    stop.set_defaults(handler=_down)


def _run(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    return run_foreground(settings, BrokerSettings(), start_broker=not args.external_broker)


def _up(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    for service in up_detached(settings, BrokerSettings(), start_broker=not args.external_broker):
        sys.stdout.write(f"started {service.name} (pid {service.process.pid}), log: {service.log_file}\n")
    return 0


def _down(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    stopped = down(BrokerSettings(), stop_broker=not args.keep_broker)
    sys.stdout.write(f"stopped: {', '.join(stopped) or 'nothing was running'}\n")
    return 0

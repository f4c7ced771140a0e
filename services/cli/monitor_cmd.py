"""`choreo monitor`: services' health and stuck sagas, as the monitor sees them."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import httpx
from pydantic import ValidationError

from services.common.settings import ChoreoSettings
from services.monitor.reader import StateTopicMissingError, read_state
from services.monitor.settings import MonitorSettings
from services.monitor.views import render_text, services_document, stuck_document

EXIT_FAILED = 1
HTTP_TIMEOUT_S = 10.0


def add_monitor_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    monitor = subparsers.add_parser(
        "monitor",
        help="services' health and stuck sagas (from monitor.state, or from a running monitor with --url)",
        description="Reads the monitor's state from the compacted monitor.state topic, so it works whether "
        "the monitor runs or not; --url asks a running monitor's /monitor/* endpoints instead.",
    )
    monitor.add_argument(
        "--url", metavar="URL", help="base URL of a running monitor, e.g. http://127.0.0.1:8104 (default: the topic)"
    )
    monitor.add_argument("--json", action="store_true", help="the two documents the HTTP endpoints serve, as JSON")
    monitor.set_defaults(handler=_monitor)


def _monitor(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    try:
        services, stuck = _from_url(args.url) if args.url else _from_topic(settings)
    except (StateTopicMissingError, httpx.HTTPError) as error:
        sys.stderr.write(f"choreo: {error}\n")
        return EXIT_FAILED
    if args.json:
        sys.stdout.write(json.dumps({"services": services["services"], "sagas": stuck}, indent=2) + "\n")
    else:
        sys.stdout.write(render_text(services, stuck) + "\n")
    return 0


def _from_topic(settings: ChoreoSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    state = asyncio.run(read_state(settings))
    # Only shown: which orders are stuck is recorded in the state itself.
    try:
        sla = MonitorSettings().monitor_saga_sla
    except ValidationError:
        sla = MonitorSettings.model_fields["monitor_saga_sla"].default
    return services_document(state.services()), stuck_document(state.sagas(), state.stats(), sla)


def _from_url(url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    base = url.rstrip("/")
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:
        services = client.get(f"{base}/monitor/services")
        services.raise_for_status()
        stuck = client.get(f"{base}/monitor/sagas/stuck")
        stuck.raise_for_status()
    documents: tuple[dict[str, Any], dict[str, Any]] = (services.json(), stuck.json())
    return documents

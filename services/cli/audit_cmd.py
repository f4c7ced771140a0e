"""`choreo audit` and `choreo status`: orders as the audit topic tells them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Iterable

from schemas.envelope import Envelope
from services.audit.reader import (
    AuditTopicMissingError,
    by_order,
    event_line,
    follow,
    order_status,
    read_all,
    read_order,
)
from services.audit.timeline import rfc3339_ms, timeline
from services.cli.arguments import positive_int
from services.common.settings import ChoreoSettings

EXIT_FAILED = 1


def add_audit_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = subparsers.add_parser("audit", help="orders' timelines from the audit topic, or a live feed")
    audit.add_argument("--order", metavar="ORDER_ID", help="only this order")
    audit.add_argument("--follow", "-f", action="store_true", help="print events as they are audited, until Ctrl-C")
    audit.add_argument("--json", action="store_true", help="raw records: one JSON envelope per line")
    audit.add_argument(
        "--limit", type=positive_int, metavar="N", help="only the N most recent orders (newest last); without --order"
    )
    audit.set_defaults(handler=_audit)

    status = subparsers.add_parser("status", help="an order's current state and last event")
    status.add_argument("order_id")
    status.set_defaults(handler=_status)


def _audit(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    try:
        if args.follow:
            return _follow(settings, args.order, as_json=args.json)
        if args.order is not None:
            envelopes = asyncio.run(read_order(settings, args.order))
            if not envelopes:
                sys.stderr.write(f"choreo: no audited events for order {args.order}\n")
                return EXIT_FAILED
            _write_order(envelopes, as_json=args.json)
            return 0
        orders = list(by_order(asyncio.run(read_all(settings))).values())
        if args.limit is not None:
            orders = orders[-args.limit :]
        if not orders:
            sys.stderr.write("choreo: the audit topic holds no events yet\n")
            return 0
        for index, envelopes in enumerate(orders):
            if index and not args.json:
                sys.stdout.write("\n")
            _write_order(envelopes, as_json=args.json)
        return 0
    except AuditTopicMissingError as error:
        sys.stderr.write(f"choreo: {error}\n")
        return EXIT_FAILED


def _status(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    try:
        envelopes = asyncio.run(read_order(settings, args.order_id))
    except AuditTopicMissingError as error:
        sys.stderr.write(f"choreo: {error}\n")
        return EXIT_FAILED
    if not envelopes:
        sys.stderr.write(f"choreo: unknown order {args.order_id} (no audited events)\n")
        return EXIT_FAILED
    status = order_status(envelopes)
    last = status.last_event
    sys.stdout.write(
        f"order {status.order_id}: {status.describe()}\n"
        f"last event: {last.type} from {last.source.value} at {rfc3339_ms(last.occurred_at)}\n"
    )
    return 0


def _follow(settings: ChoreoSettings, order_id: str | None, *, as_json: bool) -> int:
    async def tail() -> None:
        async for envelope in follow(settings, order_id=order_id):
            line = envelope.model_dump_json() if as_json else event_line(envelope, with_order=True)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    # Ctrl-C is how a tail ends, not a failure.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(tail())
    return 0


def _write_order(envelopes: Iterable[Envelope], *, as_json: bool) -> None:
    envelopes = list(envelopes)
    if as_json:
        # Re-serialized so each record is exactly one line, whatever whitespace the producer used.
        sys.stdout.writelines(envelope.model_dump_json() + "\n" for envelope in envelopes)
    else:
        sys.stdout.write(timeline(envelopes) + "\n")

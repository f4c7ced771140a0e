"""`choreo publish`: validated client commands on the `orders` topic."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas.envelope import Envelope, Source, describe_validation_error
from schemas.events import OrderCancellationRequested, OrderPlaced
from schemas.topics import ORDERS
from services.common.publisher import publish
from services.common.settings import ChoreoSettings
from services.common.tracing import process_tracing

# The service name of the client's spans: each published command starts its saga's trace.
CLIENT_SERVICE = "choreo-cli"


class InvalidCommandError(ValueError):
    """The command line or input does not make a valid event."""


def add_publish_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("publish", help="publish a client command (validated first)")
    kinds = parser.add_subparsers(dest="kind", required=True)

    order = kinds.add_parser("order", help="publish an OrderPlaced from flags, a JSON file or stdin")
    order.add_argument("--file", help="JSON file ('-' for stdin): a whole envelope, or just its `data`")
    order.add_argument("--order-id", help="order id (default: a new UUID)")
    order.add_argument("--customer", help="customer id")
    order.add_argument(
        "--item", action="append", default=[], metavar="SKU:QTY:PRICE", help="an order line; repeat for more"
    )
    order.add_argument("--currency", default="EUR", help="ISO 4217 code (default EUR)")
    order.add_argument("--country", help="destination, ISO 3166-1 alpha-2")
    order.add_argument("--postal-code")
    order.add_argument("--city")
    order.add_argument("--line1")
    order.set_defaults(handler=_publish_order)

    cancel = kinds.add_parser("cancel", help="publish an OrderCancellationRequested")
    cancel.add_argument("order_id")
    cancel.add_argument("--reason", default="customer request")
    cancel.set_defaults(handler=_publish_cancellation)


def _publish_order(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    return _send(settings, order_from_arguments(args))


def _publish_cancellation(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    try:
        event = OrderCancellationRequested(reason=args.reason)
        envelope = Envelope.new(event, order_id=args.order_id, source=Source.CLIENT)
    except ValidationError as error:
        raise InvalidCommandError(describe_validation_error(error)) from error
    return _send(settings, envelope)


def _send(settings: ChoreoSettings, envelope: Envelope) -> int:
    with process_tracing(CLIENT_SERVICE) as tracer_provider:
        [delivery] = asyncio.run(publish(settings, [envelope], tracer_provider=tracer_provider))
    result = {
        "order_id": envelope.order_id,
        "event_id": str(envelope.event_id),
        "type": envelope.type,
        "topic": delivery.topic,
        "partition": delivery.partition,
        "offset": delivery.offset,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def order_from_arguments(args: argparse.Namespace) -> Envelope:
    """Build and validate the OrderPlaced envelope described by the flags or the file."""
    if args.file is not None:
        return _order_from_document(_read_json(args.file), args.order_id)
    missing = [flag for flag, value in (("--customer", args.customer), ("--country", args.country)) if not value]
    if not args.item:
        missing.append("--item")
    if missing:
        raise InvalidCommandError(f"missing {', '.join(missing)} (or give --file)")
    data = {
        "customer_id": args.customer,
        "items": [_parse_item(text) for text in args.item],
        "currency": args.currency,
        "ship_to": {
            key: value
            for key, value in (
                ("country", args.country),
                ("postal_code", args.postal_code),
                ("city", args.city),
                ("line1", args.line1),
            )
            if value is not None
        },
    }
    return _order_from_document(data, args.order_id)


def _order_from_document(document: Any, order_id: str | None) -> Envelope:
    if not isinstance(document, dict):
        raise InvalidCommandError(f"expected a JSON object, got {type(document).__name__}")
    if "type" in document:
        try:
            envelope = Envelope.model_validate(document)
        except ValidationError as error:
            raise InvalidCommandError(describe_validation_error(error)) from error
        if type(envelope.data) not in ORDERS.events:
            raise InvalidCommandError(f"type: {envelope.type} is not a client command ({_client_commands()})")
        return envelope
    try:
        event = OrderPlaced.model_validate(document)
        return Envelope.new(event, order_id=order_id or str(uuid.uuid4()), source=Source.CLIENT)
    except ValidationError as error:
        raise InvalidCommandError(describe_validation_error(error, prefix="data")) from error


def _client_commands() -> str:
    return ", ".join(event.__name__ for event in ORDERS.events)


def _parse_item(text: str) -> dict[str, Any]:
    parts = text.split(":")
    if len(parts) != 3:
        raise InvalidCommandError(f"--item {text!r}: expected SKU:QTY:PRICE, e.g. WIDGET-1:2:19.99")
    sku, quantity, price = parts
    try:
        count: Any = int(quantity)
    except ValueError:
        count = quantity  # let the contract name the field and the problem
    return {"sku": sku, "quantity": count, "unit_price": price}


def _read_json(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise InvalidCommandError(f"--file {path}: {error.strerror}") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidCommandError(f"--file {path}: not JSON: {error}") from error


__all__ = ["InvalidCommandError", "add_publish_commands", "order_from_arguments"]

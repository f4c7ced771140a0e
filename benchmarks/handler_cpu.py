"""CPU per saga of the services' own work, without a broker: decoding, the saga rules, state, encoding.

    python -m benchmarks.handler_cpu [--sagas 1000] [--runs 5] [--mix completed=70,...] [--json PATH]

The five saga services' apps run in this one process, each task with an in-memory store. Every record an
app emits is handed to every app that reads its topic, on the partition its key names, one record per
transaction, until the choreography is quiet; the orders are `choreo bench`'s, and each must end as its
kind says (else the exit code is 1). What is timed is each app's `process` and its store's commit, as the
runner calls them: the part of a service's CPU that the Kafka client, the consume loop and the broker do
not take. It needs no broker and one core, so a change to a handler, a model or the codec is measured in
seconds; it prints the median of `--runs` runs per service (a first run, not counted, warms up).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.saga_bench import (
    DEFAULT_MIX,
    EXPECTED_TERMINAL,
    TERMINAL_TYPES,
    PlannedOrder,
    parse_mix,
    plan_orders,
    write_catalog,
)
from schemas.envelope import CE_TYPE, Envelope, Source
from schemas.topics import AUDIT, ORDERS, Topic
from services.approval.app import build_app as build_approval
from services.approval.settings import ApprovalSettings
from services.audit.app import build_app as build_audit
from services.audit.settings import AuditSettings
from services.common.kafka import partition_for
from services.common.metrics import MeteredApp
from services.common.processor import Incoming, StreamApp, TaskContext
from services.common.settings import ChoreoSettings
from services.common.state import KeyedStore
from services.common.tracing import Tracing
from services.common.transactions import Outgoing
from services.inventory.app import build_app as build_inventory
from services.inventory.settings import InventorySettings
from services.payment.app import build_app as build_payment
from services.payment.settings import PaymentSettings
from services.shipping.app import build_app as build_shipping
from services.shipping.settings import ShippingSettings

SERVICES = ("inventory", "payment", "approval", "shipping", "audit")
TOTAL = "total"


@dataclass
class Service:
    """One service's app and tasks, and what it spent."""

    app: StreamApp
    settings: ChoreoSettings
    stores: dict[int, KeyedStore]
    reads: dict[str, Topic]
    changelog: str
    tracing: Tracing = field(default_factory=Tracing)
    seconds: float = 0.0
    records_in: int = 0
    offset: int = 0

    def take(self, record: Outgoing, partition: int, written: Counter[str]) -> list[Outgoing]:
        """`record` processed by the task of `partition` in a transaction of its own; what that emitted."""
        self.offset += 1
        message = Incoming(
            self.reads[record.topic], partition, self.offset, record.key, record.value, int(time.time() * 1000),
            tuple(record.headers),
        )  # fmt: skip
        store = self.stores[partition]
        task = TaskContext(
            partition, self.settings, self.app.name, store, stream_time_ms=message.timestamp_ms, tracing=self.tracing
        )
        started = time.perf_counter()
        self.app.process(task, message)
        written[self.changelog] += len(store.pending_records())
        store.commit()
        for callback in task.tally.callbacks:  # as the runner does once the transaction committed
            callback()
        self.seconds += time.perf_counter() - started
        self.records_in += 1
        return task.outbox


def build_services(run_dir: Path, partitions: int) -> dict[str, Service]:
    common: dict[str, Any] = {"environment": "test", "partitions": partitions, "topic_prefix": "cpu."}
    inventory = InventorySettings(**common, inventory_catalog=write_catalog(run_dir))
    # Completed orders keep their charge, as in `choreo bench`: no customer runs out of credit.
    payment = PaymentSettings(**common, payment_default_credit_limit="1000000000000.00")
    approval = ApprovalSettings(**common, approval_token="handler-cpu-" + "x" * 24)
    shipping = ShippingSettings(**common)
    audit = AuditSettings(**common)
    built: dict[str, tuple[StreamApp, ChoreoSettings]] = {
        "inventory": (build_inventory(inventory), inventory),
        "payment": (build_payment(payment), payment),
        "approval": (build_approval(approval), approval),
        "shipping": (build_shipping(shipping), shipping),
        "audit": (build_audit(audit), audit),
    }
    return {
        name: Service(
            MeteredApp(app),
            settings,
            {partition: KeyedStore() for partition in range(partitions)},
            {settings.topic(topic): topic for topic in (*app.inputs, *app.in_process)},
            settings.topic(app.changelog),
        )
        for name, (app, settings) in built.items()
    }


@dataclass
class Run:
    services: dict[str, Service]
    written: Counter[str]
    terminals: dict[str, str]


def run_once(orders: Sequence[PlannedOrder], partitions: int, run_dir: Path) -> Run:
    """Every order placed in turn, each followed until nothing is left to hand on."""
    stack = build_services(run_dir, partitions)
    orders_topic, audit_topic = (stack["inventory"].settings.topic(topic) for topic in (ORDERS, AUDIT))
    run = Run(stack, Counter(), {})
    for order in orders:
        envelope = Envelope.new(order.event, order_id=order.order_id, source=Source.CLIENT)
        queue = deque([Outgoing(orders_topic, envelope.key, envelope.to_bytes(), headers=envelope.headers())])
        while queue:
            record = queue.popleft()
            run.written[record.topic] += 1
            if record.key is None:
                raise RuntimeError(f"a record without a key on {record.topic}")
            kind = dict(record.headers).get(CE_TYPE, b"").decode()
            if kind in TERMINAL_TYPES and record.topic != audit_topic:
                run.terminals.setdefault(record.key.decode(), kind)
            partition = record.partition if record.partition is not None else partition_for(record.key, partitions)
            for service in stack.values():
                if record.topic in service.reads:
                    queue.extend(service.take(record, partition, run.written))
    return run


def unexpected(orders: Sequence[PlannedOrder], terminals: dict[str, str]) -> list[str]:
    return [
        f"{order.order_id} ({order.outcome}) ended as {terminals.get(order.order_id, 'nothing')}"
        for order in orders
        if terminals.get(order.order_id) != EXPECTED_TERMINAL[order.outcome]
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sagas", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--mix", type=parse_mix, default=parse_mix(DEFAULT_MIX))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    per_saga: dict[str, list[float]] = {name: [] for name in (*SERVICES, TOTAL)}
    records_in: dict[str, float] = {}
    written: dict[str, float] = {}
    wrong: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        for number in range(args.runs + 1):
            orders = plan_orders(f"cpu-{number}-", args.sagas, args.mix, random.Random(args.seed + number))
            gc.collect()
            run = run_once(orders, args.partitions, Path(folder))
            wrong += unexpected(orders, run.terminals)
            if number == 0:
                continue
            for name, service in run.services.items():
                per_saga[name].append(service.seconds / args.sagas * 1e6)
                records_in[name] = service.records_in / args.sagas
            per_saga[TOTAL].append(sum(service.seconds for service in run.services.values()) / args.sagas * 1e6)
            written = {topic: count / args.sagas for topic, count in sorted(run.written.items())}

    medians = {name: statistics.median(values) for name, values in per_saga.items()}
    lines = [f"CPU per saga of each service's own work, µs: median of {args.runs} runs of {args.sagas} sagas"]
    for name, values in per_saga.items():
        read = f"  {records_in[name]:5.2f} records read a saga" if name in records_in else ""
        every = ", ".join(f"{value:.0f}" for value in values)
        lines.append(f"  {name:<10} {medians[name]:7.1f}{read}   (runs: {every})")
    lines.append("records written a saga (one transaction per record read, so no change to a key coalesces)")
    lines += [f"  {count:6.2f}  {topic}" for topic, count in written.items()]
    lines.append(f"orders that did not end as their kind says: {len(wrong)}")
    sys.stdout.write("\n".join(lines + wrong[:10]) + "\n")
    if args.json is not None:
        figures = {"us_per_saga": medians, "runs": per_saga, "records_per_saga": written, "unexpected": len(wrong)}
        args.json.write_text(json.dumps(figures, indent=2))
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())

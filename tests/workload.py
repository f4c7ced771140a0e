"""The workload and the invariants the end-to-end and fault-injection tests share.

A seeded RNG plans the orders (every outcome of the saga, some with a customer's cancellation), a
schedule says when each envelope is sent, and the checks read back from the broker what happened:
audit timelines per order, stock per SKU and credit per customer from the services' changelogs,
and the dead-letter topic. `settle_and_verify` waits (with a deadline) for every order to end and
the invariants to hold, then pushes one barrier order through each partition and checks again.
Set CHOREO_TEST_SEED to replay a run; the seed is in every failure message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pytest

from schemas.envelope import Envelope, Source
from schemas.events import Address, OrderCancellationRequested, OrderLine, OrderPlaced
from schemas.topics import AUDIT, DEAD_LETTER, INVENTORY_STATE, PAYMENT_STATE, Topic, topic_of
from services.common.kafka import partition_for, producer
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from tests.e2e.processes import ProcessStack, ServiceProcess
from tests.support import eventually, read_topic

log = logging.getLogger(__name__)


# Downstream first, so nothing is produced for a service that is not consuming yet.
SERVICES: tuple[str, ...] = ("audit", "shipping", "approval", "payment", "inventory")
PLENTY = 1_000_000
CATALOG: dict[str, int] = {
    "WIDGET-1": PLENTY,
    "WIDGET-2": PLENTY,
    "GADGET-1": PLENTY,
    "BOLT-M6": PLENTY,
    "NUT-M6": PLENTY,
    "CABLE-USB-C-1M": PLENTY,
    "MOUSE-WIRELESS": PLENTY,
    "MONITOR-27": PLENTY,
    "LIMITED-1": 5,
}
COMMON_SKUS = ("WIDGET-1", "WIDGET-2", "GADGET-1", "BOLT-M6", "NUT-M6", "CABLE-USB-C-1M", "MOUSE-WIRELESS")
SERVED = ("DE", "FR", "NL", "US", "GB", "JP")
APPROVAL_TIMEOUT_S = "2"

TERMINALS = ("OrderCompleted", "OrderCancelled")
AT_MOST_ONCE = (
    "OrderPlaced", "InventoryReserved", "InventoryRejected", "InventoryReleased", "PaymentCharged",
    "PaymentDeclined", "PaymentRefunded", "PaymentVoided", "ApprovalRequested", "ApprovalGranted",
    "ApprovalTimedOut", "ShipmentScheduled", "ShippingFailed", "ShipmentCancelled", "OrderCompleted",
    "OrderCancelled", "OrderCancellationRefused",
)  # fmt: skip

# Kinds of order, each with the outcome it must have unless a cancellation request interferes.
PLAIN = "plain"  # completes
UNKNOWN_SKU = "unknown-sku"  # inventory rejects (a good line beside it is held, then returned)
SCARCE = "scarce"  # LIMITED-1: completes or is rejected, stock decides
NO_CREDIT = "no-credit"  # payment declines
ANTARCTICA = "antarctica"  # shipping fails
LARGE = "large"  # needs a reviewer; none comes, approval times out
LARGE_GRANTED = "large-granted"  # needs a reviewer, who grants it (unless the deadline passes first)
LARGE_DENIED = "large-denied"  # needs a reviewer, who denies it (unless the deadline passes first)
LARGE_KINDS = (LARGE, LARGE_GRANTED, LARGE_DENIED)
BARRIER = "barrier"  # sent after everything settled, one per partition


@dataclass
class PlannedOrder:
    order_id: str
    kind: str
    placed: Envelope
    cancel: Envelope | None = None

    @property
    def details(self) -> OrderPlaced:
        assert isinstance(self.placed.data, OrderPlaced)
        return self.placed.data


@dataclass
class Timeline:
    """What the test did and when, relative to the start; written to a file and into failure messages."""

    seed: int
    path: Path
    started: float = field(default_factory=time.monotonic)
    entries: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        entry = f"t+{time.monotonic() - self.started:6.2f}s {text}"
        self.entries.append(entry)
        log.warning("%s", entry)
        self.path.write_text(f"seed {self.seed}\n" + "\n".join(self.entries) + "\n")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __str__(self) -> str:
        return f"seed {self.seed} (replay with CHOREO_TEST_SEED={self.seed}); timeline:\n" + "\n".join(self.entries)


def pick_service(rng: random.Random) -> str:
    """A service chosen by the RNG; CHOREO_TEST_VICTIM forces one (the RNG still draws, so the rest replays)."""
    drawn = rng.choice(SERVICES)
    forced = os.environ.get("CHOREO_TEST_VICTIM", "").strip()
    if forced and forced not in SERVICES:
        raise pytest.UsageError(f"CHOREO_TEST_VICTIM must be one of {', '.join(SERVICES)}, not {forced!r}")
    return forced or drawn


def seed() -> int:
    raw = os.environ.get("CHOREO_TEST_SEED", "").strip()
    return int(raw) if raw else random.SystemRandom().randrange(1, 2**31)


# --- the orders ---------------------------------------------------------------------------------------


def _line(sku: str, quantity: int, price: str) -> OrderLine:
    return OrderLine.model_validate({"sku": sku, "quantity": quantity, "unit_price": price})


def _price(rng: random.Random, low: int = 1, high: int = 60) -> str:
    return f"{rng.randint(low, high)}.{rng.randint(0, 99):02d}"


def make_order(rng: random.Random, order_id: str, kind: str) -> PlannedOrder:
    # Enough customers that a long run never spends one past its credit limit (5,000.00 by default):
    # completed orders keep their charge, so a small pool would turn plain orders into declines.
    customer = f"cust-{rng.randrange(600):03d}"
    country = rng.choice(SERVED)
    lines = [_line(sku, rng.randint(1, 3), _price(rng)) for sku in rng.sample(COMMON_SKUS, rng.randint(1, 3))]
    if kind == UNKNOWN_SKU:
        lines = [*lines[:1], _line(f"NO-SUCH-{rng.randrange(1000)}", 1, _price(rng))]
    elif kind == SCARCE:
        lines = [_line("LIMITED-1", rng.randint(1, 2), _price(rng)), *lines[:1]]
    elif kind == NO_CREDIT:
        customer = "no-credit"
    elif kind == ANTARCTICA:
        country = "AQ"
    elif kind in LARGE_KINDS:
        # One large order per customer: far below the default credit limit, so payment charges it.
        customer = f"big-{order_id}"
        lines = [_line("MONITOR-27", rng.randint(3, 4), _price(rng, 350, 450))]
    placed = OrderPlaced(customer_id=customer, items=lines, currency="EUR", ship_to=Address(country=country))
    assert (placed.total >= Decimal(1000)) == (kind in LARGE_KINDS)
    return PlannedOrder(order_id, kind, Envelope.new(placed, order_id=order_id, source=Source.CLIENT))


def plan_orders(rng: random.Random, count: int, prefix: str) -> list[PlannedOrder]:
    kinds = [PLAIN, UNKNOWN_SKU, SCARCE, NO_CREDIT, ANTARCTICA, LARGE]
    weights = [55, 9, 6, 10, 10, 10]
    orders = [make_order(rng, f"{prefix}-{n:04d}", rng.choices(kinds, weights)[0]) for n in range(count)]
    for planned in orders:
        if rng.random() < 0.15:
            planned.cancel = Envelope.new(
                OrderCancellationRequested(reason="customer changed their mind"),
                order_id=planned.order_id,
                source=Source.CLIENT,
            )
    return orders


def schedule(rng: random.Random, orders: Sequence[PlannedOrder], duration: float) -> list[tuple[float, Envelope]]:
    """When each envelope is sent: orders spread over `duration`, cancellations at random moments near theirs."""
    sends: list[tuple[float, Envelope]] = []
    for n, planned in enumerate(orders):
        at = duration * n / len(orders)
        sends.append((at, planned.placed))
        if planned.cancel is not None:
            moment = rng.random()
            if moment < 0.1:
                delay = -0.001  # before the order itself: shipping cancels an order nobody has seen yet
            elif moment < 0.3:
                delay = 0.0
            else:
                delay = rng.uniform(0.0, 3.0)
            sends.append((at + delay, planned.cancel))
    # Stable sort: an order and a cancellation at the same moment go in the order listed (order first).
    return sorted(sends, key=lambda send: send[0])


def describe(orders: Sequence[PlannedOrder], duration: float) -> str:
    """How a test's order stream is announced on its timeline."""
    cancelled = sum(1 for order in orders if order.cancel)
    return f"{len(orders)} orders ({cancelled} with a cancellation) over {duration:.0f} s"


async def send_scheduled(settings: ChoreoSettings, sends: Sequence[tuple[float, Envelope]]) -> dict[str, datetime]:
    """Send each envelope at its moment; when each was handed to the producer, by event id."""
    client = producer(settings)
    await client.start()
    sent: dict[str, datetime] = {}
    try:
        started = time.monotonic()
        pending = []
        for at, envelope in sends:
            delay = started + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            topic = settings.topic(topic_of(type(envelope.data)))
            sent[str(envelope.event_id)] = datetime.now(UTC)
            pending.append(await client.send(topic, envelope.to_bytes(), key=envelope.key))
        await asyncio.gather(*pending)
    finally:
        await client.stop()
    return sent


def barrier_orders(rng: random.Random, partitions: int, prefix: str) -> list[PlannedOrder]:
    """One plain order on each partition, so every task of every service must pass it."""
    found: dict[int, PlannedOrder] = {}
    n = 0
    while len(found) < partitions:
        order_id = f"{prefix}-barrier-{n}"
        n += 1
        partition = partition_for(order_id.encode(), partitions)
        if partition not in found:
            found[partition] = make_order(rng, order_id, PLAIN)
            found[partition].kind = BARRIER
    return [found[p] for p in sorted(found)]


# --- reading back what happened -----------------------------------------------------------------


async def audit_timelines(settings: ChoreoSettings) -> tuple[dict[str, list[Envelope]], list[str]]:
    """Audit envelopes by order, and every event id seen more than once on the audit topic."""
    timelines: dict[str, list[Envelope]] = defaultdict(list)
    ids: Counter[str] = Counter()
    for record in await read_topic(settings, AUDIT):
        envelope = Envelope.from_bytes(record.value)
        timelines[envelope.order_id].append(envelope)
        ids[str(envelope.event_id)] += 1
    return timelines, sorted(event_id for event_id, seen in ids.items() if seen > 1)


async def latest_state(settings: ChoreoSettings, changelog: Topic, prefix: str) -> dict[str, dict[str, Any]]:
    """The latest value per key of a changelog, keys starting with `prefix` (prefix stripped)."""
    latest: dict[str, dict[str, Any]] = {}
    for record in await read_topic(settings, changelog):
        key = record.key.decode()
        if not key.startswith(prefix):
            continue
        if record.value is None:
            latest.pop(key[len(prefix) :], None)
        else:
            latest[key[len(prefix) :]] = json.loads(record.value)
    return latest


async def missing_terminals(settings: ChoreoSettings, orders: Sequence[PlannedOrder]) -> list[str]:
    timelines, _ = await audit_timelines(settings)
    done = {order_id for order_id, envelopes in timelines.items() if any(e.type in TERMINALS for e in envelopes)}
    return [planned.order_id for planned in orders if planned.order_id not in done]


# --- the invariants -------------------------------------------------------------------------------


def order_violations(planned: PlannedOrder, envelopes: Sequence[Envelope]) -> list[str]:
    types = [envelope.type for envelope in envelopes]
    seen = set(types)
    where = {envelope.type: index for index, envelope in enumerate(envelopes)}
    problems = []

    def problem(text: str) -> None:
        problems.append(f"{planned.order_id} ({planned.kind}{', cancel requested' if planned.cancel else ''}): "
                        f"{text}; audit {types}")  # fmt: skip

    terminals = [t for t in types if t in TERMINALS]
    if len(terminals) != 1:
        problem(f"{len(terminals)} terminal events {terminals}")
        return problems
    for event_type, count in Counter(types).items():
        if event_type in AT_MOST_ONCE and count > 1:
            problem(f"{event_type} {count} times")
    ids = {envelope.event_id: index for index, envelope in enumerate(envelopes)}
    for index, envelope in enumerate(envelopes):
        cause = ids.get(envelope.causation_id) if envelope.causation_id is not None else None
        if cause is not None and cause > index:
            problem(f"{envelope.type} is on audit before its cause {envelopes[cause].type}")

    def before(first: str, then: str) -> None:
        if first in seen and then in seen and where[first] > where[then]:
            problem(f"{first} after {then}")

    completed = terminals[0] == "OrderCompleted"
    if completed:
        for needed in ("InventoryReserved", "PaymentCharged", "ApprovalGranted", "ShipmentScheduled"):
            if needed not in seen:
                problem(f"completed without {needed}")
        for undone in ("InventoryReleased", "PaymentRefunded", "PaymentVoided", "ShipmentCancelled"):
            if undone in seen:
                problem(f"completed but has {undone}")
    else:
        if "ShipmentScheduled" in seen:
            problem("cancelled after ShipmentScheduled")
        if "PaymentCharged" in seen and "PaymentRefunded" not in seen:
            problem("cancelled after PaymentCharged without PaymentRefunded")
        if "InventoryReserved" in seen and "InventoryReleased" not in seen:
            problem("cancelled after InventoryReserved without InventoryReleased")
        before("PaymentRefunded", "InventoryReleased")
        before("PaymentVoided", "InventoryReleased")
        before("InventoryReleased", "OrderCancelled")
        before("PaymentRefunded", "OrderCancelled")
    if "PaymentVoided" in seen and ("PaymentCharged" in seen or "PaymentRefunded" in seen):
        problem("voided and charged")
    before("PaymentCharged", "PaymentRefunded")

    # What the kind of order decides, unless the customer's cancellation got there first.
    if planned.cancel is None:
        expected = {
            PLAIN: "OrderCompleted", BARRIER: "OrderCompleted", UNKNOWN_SKU: "OrderCancelled",
            NO_CREDIT: "OrderCancelled", ANTARCTICA: "OrderCancelled", LARGE: "OrderCancelled",
        }.get(planned.kind)  # fmt: skip
        if expected is not None and terminals[0] != expected:
            problem(f"expected {expected}")
        because = {UNKNOWN_SKU: "InventoryRejected", NO_CREDIT: "PaymentDeclined", ANTARCTICA: "ShippingFailed",
                 LARGE: "ApprovalTimedOut"}.get(planned.kind)  # fmt: skip
        if because is not None and because not in seen:
            problem(f"cancelled without {because}")
        if planned.kind in (LARGE_GRANTED, LARGE_DENIED) and "PaymentCharged" in seen:
            rulings = [t for t in types if t in ("ApprovalGranted", "ApprovalDenied", "ApprovalTimedOut")]
            wanted = "ApprovalGranted" if planned.kind == LARGE_GRANTED else "ApprovalDenied"
            if rulings not in ([wanted], ["ApprovalTimedOut"]):
                problem(f"approval ruled {rulings}, expected {wanted} or a timeout")
            elif (rulings == ["ApprovalGranted"]) != completed:
                problem(f"approval ruled {rulings[0]} but the order {'completed' if completed else 'was cancelled'}")
    else:
        if completed and "OrderCancellationRefused" not in seen:
            problem("completed although cancelled by the customer, and the cancellation was not refused")
        rejected = "InventoryRejected" in seen
        if not completed and planned.kind in (PLAIN, SCARCE) and not rejected and "ShipmentCancelled" not in seen:
            problem("cancelled without ShipmentCancelled")
    if planned.kind in (UNKNOWN_SKU,) and "InventoryReserved" in seen:
        problem("an unknown SKU was reserved")
    if planned.kind in (NO_CREDIT,) and "PaymentCharged" in seen:
        problem("a customer without credit was charged")
    if planned.kind in (ANTARCTICA, LARGE, LARGE_DENIED) and "ShipmentScheduled" in seen:
        problem("shipped where it must not be")
    return problems


async def violations(
    settings: ChoreoSettings,
    orders: Sequence[PlannedOrder],
    catalog: dict[str, int],
    *,
    expected_dead_letters: Collection[bytes] = (),
    replayed: Sequence[Replay] = (),
) -> list[str]:
    """Every broken invariant, read from the broker now; empty when all hold.

    A dead letter is a violation unless its original value is one of `expected_dead_letters`, or it
    is a `replayed` record whose order the service had forgotten by then.
    """
    timelines, repeated_ids = await audit_timelines(settings)
    problems = [f"event {event_id} is on audit more than once" for event_id in repeated_ids[:20]]
    completed = []
    for planned in orders:
        envelopes = timelines.get(planned.order_id, [])
        problems.extend(order_violations(planned, envelopes))
        if any(envelope.type == "OrderCompleted" for envelope in envelopes):
            completed.append(planned)
    planned_ids = {planned.order_id for planned in orders}
    # A rejected command (poison keyed by an order id) may name an order nobody placed; anything else may not.
    strangers = sorted(
        order_id
        for order_id in set(timelines) - planned_ids
        if any(envelope.type != "OrderCommandRejected" for envelope in timelines[order_id])
    )
    if strangers:
        problems.append(f"audit has orders nobody placed: {strangers[:10]}")

    shipped: Counter[str] = Counter()
    owed: defaultdict[str, Decimal] = defaultdict(Decimal)
    for planned in completed:
        for sku, quantity in planned.details.quantities().items():
            shipped[sku] += quantity
        owed[planned.details.customer_id] += planned.details.total

    stock = await latest_state(settings, INVENTORY_STATE, "sku:")
    for sku in sorted(set(catalog) | set(stock)):
        level = stock.get(sku, {"available": catalog.get(sku, 0), "reserved": 0, "shipped": 0})
        available, reserved, out = (int(str(level[name])) for name in ("available", "reserved", "shipped"))
        initial = catalog.get(sku, 0)
        if available + reserved + out != initial:
            problems.append(f"{sku}: available {available} + reserved {reserved} + shipped {out} != {initial}")
        if reserved != 0:
            problems.append(f"{sku}: {reserved} still reserved (holds {level.get('holds')})")
        if out != shipped[sku]:
            problems.append(f"{sku}: shipped {out}, completed orders hold {shipped[sku]}")

    ledgers = await latest_state(settings, PAYMENT_STATE, "customer:")
    for customer in sorted(set(ledgers) | set(owed)):
        ledger = ledgers.get(customer, {"charged_total": "0", "refunded_total": "0"})
        net = Decimal(str(ledger["charged_total"])) - Decimal(str(ledger["refunded_total"]))
        if net != owed[customer]:
            problems.append(
                f"customer {customer}: charged {ledger['charged_total']} - refunded {ledger['refunded_total']} "
                f"= {net}, completed orders total {owed[customer]}"
            )

    for record in await read_topic(settings, DEAD_LETTER):
        letter = json.loads(record.value)
        if letter.get("value_base64") and base64.b64decode(letter["value_base64"]) in expected_dead_letters:
            continue
        if any(replay.covers(letter) for replay in replayed):
            continue
        problems.append(f"dead letter from {letter.get('consumer')}: {letter.get('reason')} ({letter.get('topic')})")
    return problems


def outcome_summary(orders: Sequence[PlannedOrder], timelines: dict[str, list[Envelope]]) -> str:
    tally: Counter[str] = Counter()
    for planned in orders:
        types = {envelope.type for envelope in timelines.get(planned.order_id, [])}
        terminal = "completed" if "OrderCompleted" in types else "cancelled"
        tally[f"{planned.kind}{'+cancel' if planned.cancel else ''}:{terminal}"] += 1
    return ", ".join(f"{key}={count}" for key, count in sorted(tally.items()))


def latencies(
    orders: Sequence[PlannedOrder],
    timelines: dict[str, list[Envelope]],
    sent: dict[str, datetime],
    *,
    kinds: Collection[str] | None = None,
) -> list[float]:
    """Seconds from handing OrderPlaced to the producer to the terminal event (as the event dates it), sorted.

    With `kinds`, only orders of those kinds that no cancellation interfered with.
    """
    spans = []
    for planned in orders:
        if kinds is not None and (planned.kind not in kinds or planned.cancel is not None):
            continue
        ends = [envelope.occurred_at for envelope in timelines.get(planned.order_id, []) if envelope.type in TERMINALS]
        placed_at = sent.get(str(planned.placed.event_id))
        if ends and placed_at is not None:
            spans.append((ends[0] - placed_at).total_seconds())
    return sorted(spans)


def percentile(spans: Sequence[float], share: float) -> float:
    return spans[min(len(spans) - 1, int(len(spans) * share))] if spans else 0.0


def latency_summary(
    orders: Sequence[PlannedOrder], timelines: dict[str, list[Envelope]], sent: dict[str, datetime]
) -> str:
    """Seconds from sending OrderPlaced to the terminal event (as the event dates it), and refusals seen."""
    spans = latencies(orders, timelines, sent)
    refused = sum(
        1 for planned in orders for envelope in timelines.get(planned.order_id, [])
        if envelope.type == "OrderCancellationRefused"
    )  # fmt: skip
    if not spans:
        return "no terminal events"
    return (
        f"placed→terminal median {percentile(spans, 0.5):.2f} s, p95 {percentile(spans, 0.95):.2f} s, "
        f"max {spans[-1]:.2f} s; {refused} cancellations refused"
    )


# --- the scenario both tests share -----------------------------------------------------------------


@dataclass
class Run:
    settings: ChoreoSettings
    stack: ProcessStack
    timeline: Timeline
    rng: random.Random
    orders: list[PlannedOrder]
    sent: dict[str, datetime] = field(default_factory=dict)
    # Values the run itself made bad on purpose: their dead letters are expected.
    poison: set[bytes] = field(default_factory=set)
    # Records a service was made to read again (its group rewound).
    replayed: list[Replay] = field(default_factory=list)


@dataclass(frozen=True)
class Replay:
    """Offsets `start` up to `end` of one partition, read a second time by `consumer`."""

    consumer: str
    topic: str
    partition: int
    start: int
    end: int

    def covers(self, letter: dict[str, Any]) -> bool:
        """A dead letter of this replay for an order forgotten since: the outcome a late record must have."""
        return (
            str(letter.get("reason", "")).startswith("expired:")
            and letter.get("consumer") == self.consumer
            and letter.get("topic") == self.topic
            and letter.get("partition") == self.partition
            and self.start <= int(letter.get("offset", -1)) < self.end
        )


def workload_env(tmp_path: Path, approval_timeout: str = APPROVAL_TIMEOUT_S) -> dict[str, dict[str, str]]:
    """Per-service environment for this workload: the test catalog, and a short approval deadline."""
    catalog_file = tmp_path / "catalog.json"
    catalog_file.write_text(json.dumps(CATALOG))
    return {
        "inventory": {"CHOREO_INVENTORY_CATALOG": str(catalog_file)},
        "approval": {"CHOREO_APPROVAL_TIMEOUT": approval_timeout},
    }


async def start_run(settings: ChoreoSettings, tmp_path: Path) -> Run:
    chosen = seed()
    timeline = Timeline(chosen, tmp_path / "timeline.txt")
    timeline.note(f"seed {chosen}; logs in {tmp_path / 'logs'}")
    await ensure_topics(settings)
    stack = ProcessStack(settings, tmp_path / "logs", workload_env(tmp_path))
    return Run(settings, stack, timeline, random.Random(chosen), [])


async def run_violations(run: Run) -> list[str]:
    return await violations(run.settings, run.orders, CATALOG, expected_dead_letters=run.poison, replayed=run.replayed)


async def settle_and_verify(run: Run, *, settle_timeout: float) -> None:
    settings, timeline = run.settings, run.timeline
    try:
        await eventually(lambda: missing_terminals(settings, run.orders), lambda missing: not missing,
                         timeout=settle_timeout, interval=1.0)  # fmt: skip
    except AssertionError as error:
        raise AssertionError(f"not every order ended: {str(error)[:2000]}\n{timeline}\n{run.stack.report()}") from None
    timeline.note(f"every one of {len(run.orders)} orders has its terminal event on audit")
    run.stack.check_alive()

    # Trailing work (moving shipped stock, releasing a late hold, refusing a late cancellation) may
    # still be in flight: wait for the invariants, then push a barrier through every partition.
    try:
        await eventually(lambda: run_violations(run), lambda found: not found, timeout=60, interval=1.0)
    except AssertionError:
        found = await run_violations(run)
        raise AssertionError(
            f"{len(found)} invariant violations:\n" + "\n".join(found[:60]) + f"\n{timeline}\n{run.stack.report()}"
        ) from None
    timeline.note("invariants hold")
    barrier = barrier_orders(run.rng, settings.partitions, run.orders[0].order_id.split("-")[0])
    run.orders.extend(barrier)
    run.sent.update(await send_scheduled(settings, [(0.0, planned.placed) for planned in barrier]))
    await eventually(lambda: missing_terminals(settings, barrier), lambda missing: not missing, timeout=60)
    found = await run_violations(run)
    timelines, _ = await audit_timelines(settings)
    timeline.note(f"after the barrier: {len(found)} violations; outcomes {outcome_summary(run.orders, timelines)}")
    timeline.note(latency_summary(run.orders, timelines, run.sent))
    assert not found, (
        f"{len(found)} invariant violations after the barrier:\n" + "\n".join(found[:60]) + f"\n{timeline}"
    )
    run.stack.check_alive()
    logged_errors = [
        f"{file}: {record.get('message')} {record.get('exception', '')[-300:]}"
        for file, record in run.stack.logged(level="ERROR")
    ]
    timeline.note(f"{len(logged_errors)} ERROR log records: {logged_errors[:5]}")


async def crash(victim: ServiceProcess, timeline: Timeline) -> None:
    answer = await victim.health()
    victim.kill()
    timeline.note(f"SIGKILLed {victim.label} (pid {victim.pid}); its last /health: {answer[1] if answer else None}")


def shared_by_all(owners: dict[str, list[int]], every: set[int]) -> bool:
    """Every instance owns some partitions, no partition twice, and none is left out."""
    parts = [set(partitions) for partitions in owners.values()]
    return all(parts) and sum(len(part) for part in parts) == len(every) and set().union(*parts) == every


async def ownership(stack: ProcessStack) -> dict[str, dict[str, list[int]]]:
    return {name: await stack.partitions_by_instance(name) for name in SERVICES}


# --- a frozen instance (SIGSTOP past its session) -----------------------------------------------------

FENCED_MARK = "TaskFencedError"
ASSIGNED_MESSAGE = "partitions assigned"

Fate = Literal["fenced", "rejoined"]


def freeze(process: ServiceProcess, signum: signal.Signals) -> None:
    assert process.pid is not None, f"{process.label} was never started"
    os.kill(process.pid, signum)
    process.history.append(f"{time.strftime('%H:%M:%S')} {signum.name} pid {process.pid}")


async def owned_by(process: ServiceProcess) -> list[int] | None:
    answer = await process.health()
    return list(answer[1].get("partitions", [])) if answer is not None and answer[0] == 200 else None


def assignments(process: ServiceProcess) -> int:
    return sum(1 for record in process.log_records() if record.get("message") == ASSIGNED_MESSAGE)


async def zombie_fate(
    stack: ProcessStack, zombie: ServiceProcess, timeline: Timeline, assigned_before: int, *, timeout: float
) -> Fate:
    """Poll until the resumed instance has exited non-zero (fenced) or got a new assignment and shares the partitions.

    Right after SIGCONT its /health still lists the partitions it owned before the freeze; only a
    fresh "partitions assigned" in its log says it went through a rebalance since.
    """
    every = set(range(stack.settings.partitions))
    deadline = time.monotonic() + timeout
    owners: dict[str, list[int]] = {}
    while True:
        assert zombie.popen is not None
        code = zombie.popen.poll()
        if code is not None:
            zombie.expected_down = True
            tail = zombie.log_tail(40)
            assert code != 0, f"{zombie.label} exited cleanly although nobody stopped it; log tail:\n{tail}"
            # The traceback is followed by the exit's noise (aborted sends, unclosed producers): read it all.
            assert zombie.log_file is not None
            fenced = [line for line in zombie.log_file.read_text(errors="replace").splitlines() if FENCED_MARK in line]
            assert fenced, f"{zombie.label} exited with {code} but its log never names {FENCED_MARK}; log tail:\n{tail}"
            timeline.note(f"{zombie.label} exited with {code}: fenced ({fenced[-1].strip()[:160]})")
            return "fenced"
        owners = await stack.partitions_by_instance(zombie.name)
        if shared_by_all(owners, every) and zombie.alive() and assignments(zombie) > assigned_before:
            timeline.note(f"{zombie.label} rejoined cleanly: {owners}")
            return "rejoined"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{zombie.label} neither exited nor rejoined within {timeout} s (owners {owners}); "
                f"log tail:\n{zombie.log_tail(40)}\n{timeline}\n{stack.report()}"
            )
        await asyncio.sleep(0.3)

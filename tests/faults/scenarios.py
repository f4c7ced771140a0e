"""The faults, one function each: inject, release, wait for recovery, and leave the checks only the end can make."""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import json
import os
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from schemas.deadletter import DeadLetter
from schemas.envelope import Envelope
from schemas.events import ApprovalRequested
from schemas.topics import DEAD_LETTER, ORDERS, STOCK_REQUESTS
from services.common.broker import LocalBroker
from services.common.kafka import admin_client, partition_for
from services.common.settings import ChoreoSettings
from services.payment.settings import PaymentSettings
from tests.e2e.processes import ServiceProcess
from tests.faults.harness import SAGA_SERVICES, FaultRun, Scenario, alerts_by_subject, monitor_get
from tests.support import eventually, read_topic
from tests.workload import (
    ANTARCTICA,
    LARGE,
    PLAIN,
    PlannedOrder,
    Replay,
    assignments,
    audit_timelines,
    freeze,
    latencies,
    make_order,
    owned_by,
    percentile,
    shared_by_all,
    zombie_fate,
)

KILL_DOWNTIME_S = (0.2, 3.0)
BROKER_DOWNTIME_S = (1.0, 4.0)
BROKER_START_TIMEOUT_S = 120.0
REWIND_RECORDS = 60
TAKEOVER_TIMEOUT_S = 60.0
FATE_TIMEOUT_S = 45.0
DEADLINE_ORDERS = 4
REFUND_OUTAGE_SETTING = "payment_refund_outages"
REFUND_OUTAGE_S = 8.0
REFUND_ORDERS = 4
UNWOUND = ("PaymentRefunded", "InventoryReleased", "OrderCancelled")
POISON_FOLLOWERS = 3
# A follower of a poison record may be slower than usual, but not by more than this factor of the p99 of the
# orders placed while no fault was active.
POISON_LATENCY_FACTOR = 3.0
# A blocked partition stalls its followers until the run ends; in the first seconds of a run, on a
# broker still cold, an unblocked follower once took 1.6 s against a quiet p99 of 0.23 s.
POISON_LATENCY_FLOOR_S = 2.0
SCALABLE = ("inventory", "payment", "shipping", "approval", "audit")


def plan(run: FaultRun) -> list[Scenario]:
    """One pass of every fault, in an order and on victims the run's RNG picks."""
    rng = run.rng
    scaled = rng.choice(SCALABLE)
    drawn = rng.choice(SAGA_SERVICES)  # drawn even when forced, so the rest of the run replays the same
    rewound = os.environ.get("CHOREO_FAULTS_REWIND", "").strip() or drawn
    steps: list[Scenario] = [functools.partial(poison, run)]
    victims = rng.sample(SAGA_SERVICES, len(SAGA_SERVICES))
    together = run.profile.kill_together
    steps += [
        functools.partial(kill_services, run, victims[n : n + together]) for n in range(0, len(victims), together)
    ]
    steps += [
        functools.partial(rewind_group, run, rewound),
        functools.partial(scale_out, run, scaled),
        functools.partial(freeze_past_session, run, scaled),
        functools.partial(scale_in, run, scaled),
        functools.partial(approval_down_across_deadlines, run),
        functools.partial(restart_monitor, run),
        functools.partial(kill_broker, run),
        functools.partial(refund_outage, run),
    ]
    return steps


def alive(run: FaultRun, name: str) -> list[ServiceProcess]:
    return [process for process in run.stack.instances(name) if process.alive()]


# --- crashes -------------------------------------------------------------------------------------


async def kill_services(run: FaultRun, names: list[str]) -> None:
    """SIGKILL services at a random moment and start each again after its own random downtime."""
    victims = [run.primary(name) for name in names]
    labels = "+".join(victim.label for victim in victims)
    fault = run.inject("sigkill", labels, f"pids {', '.join(str(victim.pid) for victim in victims)}")
    for victim in victims:
        victim.kill()

    async def restart(victim: ServiceProcess) -> None:
        await asyncio.sleep(run.rng.uniform(*KILL_DOWNTIME_S))
        victim.start()

    await asyncio.gather(*(restart(victim) for victim in victims))
    run.release(fault)
    await run.recover(fault)


async def kill_broker(run: FaultRun) -> None:
    """kill -9 the broker and start it again: services reconnect, or exit and are restarted by the supervisor."""
    assert isinstance(run.broker, LocalBroker), "the single-broker pass kills its one broker"
    exits_before = len(run.supervisor.exits)
    fault = run.inject("broker kill-9", "broker", f"pid {run.broker.status().pid}")
    run.broker.kill()
    await asyncio.sleep(run.rng.uniform(*BROKER_DOWNTIME_S))
    await asyncio.to_thread(run.broker.start, BROKER_START_TIMEOUT_S)
    run.release(fault)
    await run.recover(fault)
    exited = run.supervisor.exits[exits_before:]
    fault.detail = f"{len(exited)} service exits restarted by the supervisor" + (
        f": {', '.join(sorted({line.split()[0] for line in exited}))}" if exited else ", every service reconnected"
    )


async def restart_monitor(run: FaultRun) -> None:
    """SIGKILL the monitor and start it again: it carries on from monitor.state (checked by `monitor_alerts_once`)."""
    monitor = run.primary("monitor")
    port = run.ports["monitor"]
    before = await eventually(lambda: check_counts(port), bool, timeout=30)
    fault = run.inject("sigkill", monitor.label, f"pid {monitor.pid}")
    monitor.kill()
    await asyncio.sleep(run.rng.uniform(*KILL_DOWNTIME_S))
    monitor.start()
    run.release(fault)
    # Its counters continue from the state it wrote before the kill, for every service it checks.
    after = await eventually(
        lambda: check_counts(port),
        lambda counts: bool(counts) and all(counts.get(name, 0) > count for name, count in before.items()),
        timeout=60,
        interval=0.5,
    )
    fault.detail = f"check counts {sum(before.values())} before the kill, {sum(after.values())} after"
    await run.recover(fault)


async def check_counts(port: int) -> dict[str, int]:
    body = await monitor_get(port, "/monitor/services")
    return {row["service"]: int(row["check_count"]) for row in (body or {}).get("services", [])}


async def monitor_alerts_once(run: FaultRun) -> list[str]:
    """Each status change of a service is alerted once: no event id twice, never the same change twice in a row."""
    problems = []
    for subject, envelopes in (await alerts_by_subject(run.settings)).items():
        ids = [str(envelope.event_id) for envelope in envelopes]
        if len(ids) != len(set(ids)):
            problems.append(f"monitor alert repeated for {subject}: {[e.type for e in envelopes]}")
        changes = [envelope.type for envelope in envelopes if envelope.type in ("ServiceDegraded", "ServiceRecovered")]
        if any(first == then for first, then in itertools.pairwise(changes)):
            problems.append(f"monitor raised one status change twice for {subject}: {changes}")
    return problems


# --- a second instance, and a frozen one --------------------------------------------------------------


async def scale_out(run: FaultRun, name: str) -> None:
    """1 → 2 instances mid-run: the partitions are shared out."""
    fault = run.inject("scale 1→2", name)
    extra = run.add(name)
    extra.start()
    run.release(fault)
    every = set(range(run.settings.partitions))
    live = {process.label for process in alive(run, name)}
    owners = await eventually(
        lambda: run.stack.partitions_by_instance(name),
        lambda found: shared_by_all({label: found.get(label, []) for label in live}, every),
        timeout=TAKEOVER_TIMEOUT_S,
    )
    fault.detail = f"owners {owners}"
    await run.recover(fault)


async def freeze_past_session(run: FaultRun, name: str) -> None:
    """SIGSTOP one of two instances until the other owns every partition, then SIGCONT: the old one is fenced."""
    zombie, survivor = run.rng.sample(alive(run, name), 2)
    every = list(range(run.settings.partitions))
    fault = run.inject("sigstop", zombie.label, "past its session timeout")
    with run.supervisor.hold(zombie):
        freeze(zombie, signal.SIGSTOP)
        stopped = time.monotonic()
        # A frozen process accepts the connection but never answers, so only the survivor is asked.
        await eventually(lambda: owned_by(survivor), lambda owned: owned == every,
                         timeout=TAKEOVER_TIMEOUT_S, interval=0.5)  # fmt: skip
        assigned_before = assignments(zombie)
        freeze(zombie, signal.SIGCONT)
        run.release(fault)
        frozen = time.monotonic() - stopped
        fate = await zombie_fate(run.stack, zombie, run.timeline, assigned_before, timeout=FATE_TIMEOUT_S)
        if fate == "fenced":
            zombie.start()
    fault.detail = f"frozen {frozen:.1f} s; the old instance {fate}"
    await run.recover(fault)


async def scale_in(run: FaultRun, name: str) -> None:
    """2 → 1 instances: the extra one stops cleanly and the first one takes every partition back."""
    extra = next(process for process in alive(run, name) if process.instance != 1)
    fault = run.inject("scale 2→1", extra.label)
    await asyncio.to_thread(extra.stop)
    run.release(fault)
    every = list(range(run.settings.partitions))
    await eventually(lambda: owned_by(run.primary(name)), lambda owned: owned == every, timeout=TAKEOVER_TIMEOUT_S)
    await run.recover(fault)


# --- duplicates ------------------------------------------------------------------------------------


async def rewind_group(run: FaultRun, name: str) -> None:
    """Stop a service, move its consumer group's committed offsets back, start it: it reads those records again."""
    victim = run.primary(name)
    fault = run.inject("rewind", run.settings.group(name), f"{REWIND_RECORDS} records per partition")
    await asyncio.to_thread(victim.stop)
    ranges = await rewind_offsets(run.settings, run.settings.group(name), REWIND_RECORDS)
    run.replayed.extend(Replay(name, tp.topic, tp.partition, start, end) for tp, (start, end) in ranges.items())
    victim.start()
    run.release(fault)
    fault.detail = f"{sum(end - start for start, end in ranges.values())} records to read again"
    await run.recover(fault)


async def rewind_offsets(settings: ChoreoSettings, group: str, back: int) -> dict[TopicPartition, tuple[int, int]]:
    """Commit offsets `back` records before the group's committed ones (the group must be empty).

    Returns the offsets each partition reads again: from the new committed offset up to the old one."""
    admin = admin_client(settings)
    await admin.start()
    try:
        committed: dict[Any, OffsetAndMetadata] = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    older = {tp: OffsetAndMetadata(max(0, meta.offset - back), "") for tp, meta in committed.items() if meta.offset > 0}
    rewinder = AIOKafkaConsumer(**settings.kafka_options(), group_id=group, enable_auto_commit=False)
    await rewinder.start()
    try:
        rewinder.assign(list(older))
        await rewinder.commit(older)
    finally:
        await rewinder.stop()
    return {tp: (meta.offset, committed[tp].offset) for tp, meta in older.items()}


# --- poison ------------------------------------------------------------------------------------------


async def poison(run: FaultRun) -> None:
    """Not-JSON, schema-invalid and unknown-type records on orders (and not-JSON on an internal topic) under load.

    Plain orders on the same partition follow at once; at the end each poison record must be on the
    dead-letter topic with its reason, and the followers' latency within the run's usual bounds.
    """
    partitions = run.settings.partitions
    partition = run.rng.randrange(partitions)
    number = len(run.faults)
    ids = order_ids_on(partition, partitions, f"{run.prefix}-poison{number}", 1 + POISON_FOLLOWERS)
    victim = make_order(run.rng, ids[0], PLAIN).placed
    unknown_type = victim.model_dump(mode="json") | {"type": "OrderTeleported"}
    invalid = victim.model_dump(mode="json")
    invalid["data"]["items"][0]["quantity"] = 0
    on_orders = {
        f"not JSON {ids[0]}".encode(): "JSON",
        json.dumps(unknown_type).encode(): "OrderTeleported",
        json.dumps(invalid).encode(): "quantity",
    }
    sku = b"WIDGET-1"
    internal = f"not JSON either {ids[0]}".encode()
    fault = run.inject("poison", f"orders/{partition}", f"3 records, and 1 on {STOCK_REQUESTS.name}")
    run.poison.update([*on_orders, internal])
    for value in on_orders:
        await run.load.send_raw(run.settings.topic(ORDERS), victim.key, value, partition)
    await run.load.send_raw(run.settings.topic(STOCK_REQUESTS), sku, internal, partition_for(sku, partitions))
    followers = [make_order(run.rng, order_id, PLAIN) for order_id in ids[1:]]
    for planned in followers:
        run.load.place(planned)
    run.release(fault)
    await run.recover(fault)
    expected = {**on_orders, internal: "JSON"}
    run.final_checks.append(functools.partial(poison_handled, run, expected, followers))


def order_ids_on(partition: int, partitions: int, prefix: str, count: int) -> list[str]:
    found: list[str] = []
    n = 0
    while len(found) < count:
        order_id = f"{prefix}-{n}"
        n += 1
        if partition_for(order_id.encode(), partitions) == partition:
            found.append(order_id)
    return found


async def poison_handled(run: FaultRun, expected: dict[bytes, str], followers: list[PlannedOrder]) -> list[str]:
    problems = []
    letters: dict[bytes, list[DeadLetter]] = {}
    for record in await read_topic(run.settings, DEAD_LETTER):
        letter = DeadLetter.model_validate_json(record.value)
        letters.setdefault(base64.b64decode(letter.value_base64 or ""), []).append(letter)
    for value, reason in expected.items():
        found = letters.get(value, [])
        if not found:
            problems.append(f"poison {value[:40]!r} is not on the dead-letter topic")
        for letter in found:
            if reason not in letter.reason:
                problems.append(f"dead letter of {value[:40]!r} from {letter.consumer}: reason {letter.reason!r}")
    timelines, _ = await audit_timelines(run.settings)
    usual = latencies(run.quiet_orders(), timelines, run.sent, kinds=(PLAIN,))
    bound = max(POISON_LATENCY_FACTOR * percentile(usual, 0.99), POISON_LATENCY_FLOOR_S)
    slow = latencies(followers, timelines, run.sent, kinds=(PLAIN,))
    consumers = sorted({letter.consumer for found in letters.values() for letter in found})
    run.notes.append(
        f"poison: dead-lettered by {consumers}; followers on the same partition took "
        f"{', '.join(f'{span:.2f}' for span in slow)} s (orders placed while no fault was active: "
        f"p50 {percentile(usual, 0.5):.2f} s, p99 {percentile(usual, 0.99):.2f} s)"
    )
    if len(slow) != len(followers):
        problems.append(f"only {len(slow)} of {len(followers)} orders after the poison ended")
    problems += [f"an order after the poison took {span:.2f} s, over {bound:.2f} s" for span in slow if span > bound]
    return problems


# --- approval down across deadlines ----------------------------------------------------------------------


async def approval_down_across_deadlines(run: FaultRun) -> None:
    """Stop approval while orders wait for a reviewer, start it after their deadlines: each times out once."""
    number = len(run.faults)
    waiting = [make_order(run.rng, f"{run.prefix}-deadline{number}-{n}", LARGE) for n in range(DEADLINE_ORDERS)]
    for planned in waiting:
        run.load.place(planned)
    deadlines = await eventually(lambda: requested_deadlines(run.settings, waiting),
                                 lambda found: len(found) == len(waiting), timeout=60)  # fmt: skip
    approval = run.primary("approval")
    fault = run.inject("stop", approval.label, f"across the deadlines of {len(waiting)} approvals")
    await asyncio.to_thread(approval.stop)
    timed_out_early = await count_types(run.settings, waiting, "ApprovalTimedOut")
    latest = max(deadlines.values())
    await asyncio.sleep(max(0.0, (latest - datetime.now(UTC)).total_seconds()) + 1.0)
    restarted_at = datetime.now(UTC)
    approval.start()
    run.release(fault)
    fault.detail = f"{timed_out_early} had timed out before the stop"
    await run.recover(fault)
    run.final_checks.append(functools.partial(timed_out_once, run, waiting, restarted_at, timed_out_early))


async def requested_deadlines(settings: ChoreoSettings, orders: list[PlannedOrder]) -> dict[str, datetime]:
    timelines, _ = await audit_timelines(settings)
    return {
        planned.order_id: envelope.data.deadline
        for planned in orders
        for envelope in timelines.get(planned.order_id, [])
        if isinstance(envelope.data, ApprovalRequested)
    }


async def count_types(settings: ChoreoSettings, orders: list[PlannedOrder], event_type: str) -> int:
    timelines, _ = await audit_timelines(settings)
    return sum(1 for o in orders for envelope in timelines.get(o.order_id, []) if envelope.type == event_type)


async def timed_out_once(
    run: FaultRun, waiting: list[PlannedOrder], restarted_at: datetime, timed_out_early: int
) -> list[str]:
    problems = []
    timelines, _ = await audit_timelines(run.settings)
    late = 0
    for planned in waiting:
        envelopes: list[Envelope] = timelines.get(planned.order_id, [])
        types = [envelope.type for envelope in envelopes]
        timeouts = [envelope for envelope in envelopes if envelope.type == "ApprovalTimedOut"]
        if len(timeouts) != 1:
            problems.append(f"{planned.order_id}: {len(timeouts)} ApprovalTimedOut; audit {types}")
            continue
        late += timeouts[0].occurred_at >= restarted_at
        after = types[types.index("ApprovalTimedOut") :]
        if [t for t in after if t in UNWOUND] != list(UNWOUND):
            problems.append(f"{planned.order_id}: compensations after the timeout out of order; audit {types}")
    if late + timed_out_early != len(waiting):
        problems.append(f"only {late} of {len(waiting) - timed_out_early} timeouts fired after approval restarted")
    return problems


# --- a compensation that fails for a while ------------------------------------------------------------


async def refund_outage(run: FaultRun) -> None:
    """Restart payment with the refund provider down for a while, while refunds are due: retried until done.

    Orders shipping cannot serve are placed right after the restart, so their refunds fall in the
    outage. At the end each must show its failed attempts on audit, then exactly one PaymentRefunded,
    then the release and OrderCancelled. Needs the payment service's refund-outage setting; without
    it the run says so in its report.
    """
    if REFUND_OUTAGE_SETTING not in PaymentSettings.model_fields:
        run.notes.append("refund outage: pending (the payment service has no refund-outage setting)")
        return
    payment = run.primary("payment")
    start = datetime.now(UTC)
    end = start + timedelta(seconds=REFUND_OUTAGE_S)
    fault = run.inject("refund outage", payment.label, f"refund provider down {REFUND_OUTAGE_S:.0f} s")
    await asyncio.to_thread(payment.stop)
    window = [{"start": start.isoformat(), "end": end.isoformat()}]
    payment.env[f"CHOREO_{REFUND_OUTAGE_SETTING.upper()}"] = json.dumps(window)
    payment.start()
    await payment.wait_healthy()
    number = len(run.faults)
    refunded = [make_order(run.rng, f"{run.prefix}-refund{number}-{n}", ANTARCTICA) for n in range(REFUND_ORDERS)]
    for planned in refunded:
        run.load.place(planned)
    await asyncio.sleep(max(0.0, (end - datetime.now(UTC)).total_seconds()))
    run.release(fault)
    await run.recover(fault)
    run.final_checks.append(functools.partial(refunds_retried, run, refunded))


async def refunds_retried(run: FaultRun, refunded: list[PlannedOrder]) -> list[str]:
    problems = []
    timelines, _ = await audit_timelines(run.settings)
    failed_attempts = 0
    for planned in refunded:
        types = [envelope.type for envelope in timelines.get(planned.order_id, [])]
        failed = types.count("PaymentRefundFailed")
        failed_attempts += failed
        if not failed:
            problems.append(f"{planned.order_id}: no failed refund attempt on audit during the outage; audit {types}")
            continue
        last_failure = len(types) - 1 - types[::-1].index("PaymentRefundFailed")
        if [t for t in types[last_failure:] if t in UNWOUND] != list(UNWOUND):
            problems.append(f"{planned.order_id}: after the failed refunds, not {list(UNWOUND)}; audit {types}")
    every = sum(envelope.type == "PaymentRefundFailed" for found in timelines.values() for envelope in found)
    run.notes.append(
        f"refund outage: {failed_attempts} failed attempts on audit for the {len(refunded)} orders placed in it "
        f"({every} in the whole run); each refund completed once"
    )
    return problems

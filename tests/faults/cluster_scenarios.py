"""Faults of a replicated cluster under the saga load: nodes killed, frozen, restarted, two at once.

Each scenario names its victim from what the cluster reports at that moment (the leader of a busy
partition, the coordinator of a service's transactions, the active controller), injects the fault,
brings the node back, waits until the stack has recovered and every partition is fully replicated again,
and writes into the fault's detail the client errors the services logged meanwhile and how they recovered.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from schemas.topics import ORDERS
from services.common.broker import LocalBroker, LocalCluster
from services.common.topics import describe_topics
from tests.faults.harness import SAGA_SERVICES, Fault, FaultRun, Scenario
from tests.support import eventually, read_topic
from tests.workload import missing_terminals

NODE_DOWNTIME_S = (2.0, 5.0)
NODE_START_TIMEOUT_S = 120.0
REPLICATED_TIMEOUT_S = 120.0
# Both nodes stay away this long: every producer meets NOT_ENOUGH_REPLICAS or times out meanwhile.
TWO_DOWN_S = 8.0
# Past replica.lag.time.max.ms (30 s) and the services' session timeouts, so the frozen node leaves the ISR.
FROZEN_S = 35.0
# __transaction_state has this many partitions on the local cluster (transaction.state.log.num.partitions).
TRANSACTION_STATE_PARTITIONS = 10
_ERROR_NAME = re.compile(r"\b([A-Z][A-Za-z]+(?:Error|Exception))\b")


def cluster_plan(run: FaultRun, *, full: bool) -> list[Scenario]:
    steps: list[Callable[[FaultRun], Awaitable[None]]] = [
        kill_partition_leader,
        kill_transaction_coordinator,
        kill_active_controller,
        two_nodes_down,
    ]
    if full:
        steps += [freeze_node, rolling_restart]
    return [functools.partial(step, run) for step in steps]


def cluster_of(run: FaultRun) -> LocalCluster:
    assert isinstance(run.broker, LocalCluster), "the cluster pass runs on a LocalCluster"
    return run.broker


async def kill_partition_leader(run: FaultRun) -> None:
    """kill -9 the leader of a partition of `orders` while it takes writes, then start it again."""
    partition = run.rng.randrange(run.settings.partitions)
    [orders] = await describe_topics(run.settings, [ORDERS])
    leader = orders.placement[partition].leader
    assert leader is not None, f"orders p{partition} has no leader"
    await _kill_and_restart(run, "leader kill-9", leader, f"leader of orders p{partition}")


async def kill_transaction_coordinator(run: FaultRun) -> None:
    """kill -9 the node that coordinates a saga service's transactions (the leader of its __transaction_state)."""
    name = run.rng.choice(SAGA_SERVICES)
    answer = await run.primary(name).health()
    assert answer is not None, f"{name} does not answer /health"
    transactional_id = str(answer[1]["transactional_id"])
    slot = abs(java_string_hash(transactional_id)) % TRANSACTION_STATE_PARTITIONS
    node = await _leader_of(run, "__transaction_state", slot)
    await _kill_and_restart(run, "coordinator kill-9", node, f"coordinates {name}'s {transactional_id}")


async def kill_active_controller(run: FaultRun) -> None:
    status = await asyncio.to_thread(cluster_of(run).status)
    assert status.controller_id is not None, f"no active controller: {status}"
    await _kill_and_restart(run, "controller kill-9", status.controller_id, "the active controller")


async def two_nodes_down(run: FaultRun) -> None:
    """kill -9 two of three nodes: writes need two in-sync replicas, so the stack stalls, then resumes."""
    cluster = cluster_of(run)
    victims = run.rng.sample([node.node_id for node in cluster.nodes], 2)
    fault, mark = _inject(run, "two nodes down", "+".join(f"node {n}" for n in victims), "kill -9 both")
    for node_id in victims:
        cluster.node(node_id).kill()
    await asyncio.sleep(TWO_DOWN_S)
    await asyncio.gather(*(asyncio.to_thread(cluster.node(n).start, NODE_START_TIMEOUT_S) for n in victims))
    await _recovered(run, fault, mark)


async def freeze_node(run: FaultRun) -> None:
    """SIGSTOP a node past the replica lag and session timeouts (cut off from the rest), then SIGCONT it."""
    node = cluster_of(run).node(run.rng.choice([n.node_id for n in cluster_of(run).nodes]))
    fault, mark = _inject(run, "node frozen", f"node {node.node_id}", f"SIGSTOP for {FROZEN_S:.0f} s")
    node.pause()
    try:
        await asyncio.sleep(FROZEN_S)
    finally:
        node.resume()
    await _recovered(run, fault, mark)


async def rolling_restart(run: FaultRun) -> None:
    """Stop and start every node in turn, cleanly, each once the cluster is fully replicated again."""
    cluster = cluster_of(run)
    fault, mark = _inject(run, "rolling restart", "all nodes", "SIGTERM, start, wait for full replication")
    for node in cluster.nodes:
        await asyncio.to_thread(node.stop)
        await asyncio.to_thread(node.start, NODE_START_TIMEOUT_S)
        await _fully_replicated(run)
    await _recovered(run, fault, mark)


async def _kill_and_restart(run: FaultRun, name: str, node_id: int, why: str) -> None:
    node: LocalBroker = cluster_of(run).node(node_id)
    fault, mark = _inject(run, name, f"node {node_id}", why)
    node.kill()
    await asyncio.sleep(run.rng.uniform(*NODE_DOWNTIME_S))
    await asyncio.to_thread(node.start, NODE_START_TIMEOUT_S)
    await _recovered(run, fault, mark)


def _inject(run: FaultRun, name: str, target: str, detail: str) -> tuple[Fault, tuple[dict[Path, int], int, int]]:
    mark = (_log_sizes(run), len(run.supervisor.exits), run.load.counts["sends retried"])
    return run.inject(name, target, detail), mark


async def _recovered(run: FaultRun, fault: Fault, mark: tuple[dict[Path, int], int, int]) -> None:
    run.release(fault)
    await run.recover(fault)
    await _fully_replicated(run)
    sizes, exits, retried = mark
    errors = _errors_logged_since(run.stack.log_dir, sizes)
    restarted = len(run.supervisor.exits) - exits
    seen = ", ".join(f"{name} x{count}" for name, count in errors.most_common(6)) or "none"
    fault.detail += (
        f"; errors the services logged: {seen}; services restarted by the supervisor: {restarted}; "
        f"client sends retried: {run.load.counts['sends retried'] - retried}"
    )


async def _fully_replicated(run: FaultRun) -> None:
    cluster = cluster_of(run)

    async def under_replicated() -> int | None:
        status = await asyncio.to_thread(cluster.status)
        return status.under_replicated if all(node.up for node in status.nodes) else None

    await eventually(under_replicated, lambda count: count == 0, timeout=REPLICATED_TIMEOUT_S, interval=1.0)


async def _leader_of(run: FaultRun, topic: str, partition: int) -> int:
    admin = AIOKafkaAdminClient(**run.settings.kafka_options())
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    leader = next(p["leader"] for p in described["partitions"] if p["partition"] == partition)
    assert leader >= 0, f"{topic} p{partition} has no leader"
    return int(leader)


def java_string_hash(text: str) -> int:
    """Java's String.hashCode, which Kafka uses to place a transactional id on __transaction_state."""
    value = 0
    for unit in text.encode("utf-16-be").hex(" ", 2).split():
        value = (31 * value + int(unit, 16)) & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _log_sizes(run: FaultRun) -> dict[Path, int]:
    return {path: path.stat().st_size for path in run.stack.log_dir.glob("*.log")}


def _errors_logged_since(folder: Path, sizes: dict[Path, int]) -> collections.Counter[str]:
    """Exception names in the WARNING and ERROR lines the services wrote since `sizes` was taken."""
    found: collections.Counter[str] = collections.Counter()
    for path in folder.glob("*.log"):
        with path.open("rb") as handle:
            handle.seek(sizes.get(path, 0))
            text = handle.read().decode(errors="replace")
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or record.get("level") not in ("WARNING", "ERROR"):
                continue
            found.update(_ERROR_NAME.findall(json.dumps(record)))
    return found


async def acknowledged_writes_lost(run: FaultRun) -> list[str]:
    """I4: every client command the broker acknowledged is on its topic, and each acknowledged order ended."""
    if not run.acknowledged:
        return ["I4: the publisher saw no write acknowledged, so nothing was checked"]
    records = await read_topic(run.settings, ORDERS)
    on_orders = {_event_id(record.value) for record in records}
    topic = run.settings.topic(ORDERS)
    lost = [event_id for event_id, where in run.acknowledged.items() if where == topic and event_id not in on_orders]
    placed = {str(order.placed.event_id): order for order in run.orders}
    acknowledged_orders = [placed[event_id] for event_id in run.acknowledged if event_id in placed]
    unfinished = await missing_terminals(run.settings, acknowledged_orders)
    return [f"I4: acknowledged OrderPlaced {event_id} is not on orders" for event_id in lost] + [
        f"I4: acknowledged order {order_id} never reached a terminal event" for order_id in unfinished
    ]


def _event_id(value: bytes | None) -> str | None:
    if not value:
        return None
    try:
        document = json.loads(value)
    except ValueError:
        return None
    return str(document.get("event_id")) if isinstance(document, dict) else None

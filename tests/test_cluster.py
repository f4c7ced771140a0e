"""A local three-node KRaft cluster: every node up, replicated topics, and writes that survive a killed leader.

The cluster is this module's own (it kills nodes); every wait polls against a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from schemas.topics import ORDERS
from services.common.broker import BrokerSettings, ClusterStatus, LocalCluster
from services.common.settings import ChoreoSettings
from services.common.topics import describe_topics, ensure_topics
from tests.kafka_fixtures import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    run_dir: Path = tmp_path_factory.mktemp("cluster") / "broker"
    local = LocalCluster(BrokerSettings(port=free_port(), run_dir=run_dir, heap="384m", nodes=3))
    try:
        local.start(timeout=180)
        yield local
    finally:
        local.stop()


def _poll_status(cluster: LocalCluster, done: Callable[[ClusterStatus], bool]) -> ClusterStatus:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        status = cluster.status()
        if done(status):
            return status
        assert time.monotonic() < deadline, f"cluster never reached the state wanted: {status}"
        time.sleep(0.5)


def test_three_nodes_up_with_one_active_controller(cluster: LocalCluster) -> None:
    status = _poll_status(cluster, lambda s: all(n.up for n in s.nodes) and s.controller_id is not None)
    assert [node.node_id for node in status.nodes] == [1, 2, 3]
    assert len({node.pid for node in status.nodes}) == 3
    assert len({node.bootstrap for node in status.nodes}) == 3
    assert status.controller_id in (1, 2, 3)
    assert all(node.run_dir.name == f"node-{node.node_id}" for node in cluster.nodes)


async def _partitions(bootstrap: str, topic: str) -> list[dict[str, object]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions: list[dict[str, object]] = described["partitions"]
    return partitions


async def test_topics_are_replicated_and_a_killed_leader_loses_no_acknowledged_write(
    cluster: LocalCluster, unique_name: Callable[[str], str]
) -> None:
    prefix = unique_name("cluster") + "."
    settings = ChoreoSettings(bootstrap_servers=cluster.bootstrap, topic_prefix=prefix, replication_factor=3)
    [created] = await ensure_topics(settings, [ORDERS])
    assert created.replication_factor == 3
    assert created.config["min.insync.replicas"] == "2"
    topic = settings.topic(ORDERS)
    partitions = await _partitions(cluster.bootstrap, topic)
    assert all(len(p["replicas"]) == 3 for p in partitions)  # type: ignore[arg-type]

    producer = AIOKafkaProducer(
        bootstrap_servers=cluster.bootstrap, transactional_id=f"{prefix}tx", request_timeout_ms=15000
    )
    await producer.start()
    acknowledged: list[bytes] = []
    try:
        for index in range(20):
            async with producer.transaction():
                await producer.send_and_wait(topic, f"before-{index}".encode(), partition=0)
            acknowledged.append(f"before-{index}".encode())
        leader = int(next(p["leader"] for p in partitions if p["partition"] == 0))  # type: ignore[call-overload]
        cluster.node(leader).kill()
        for index in range(20):
            async with producer.transaction():
                await producer.send_and_wait(topic, f"after-{index}".encode(), partition=0)
            acknowledged.append(f"after-{index}".encode())
    finally:
        await producer.stop()

    seen = await _read_committed(cluster.bootstrap, topic, len(acknowledged))
    assert seen == acknowledged
    # What `choreo topics describe` shows: the dead node leaves the in-sync replicas, and is back after its restart.
    deadline = time.monotonic() + DEADLINE_S
    while True:
        [described] = await describe_topics(settings, [ORDERS])
        if all(leader not in placement.isr for placement in described.placement):
            break
        assert time.monotonic() < deadline, f"node {leader} still in sync: {described.placement}"
        await asyncio.sleep(0.5)
    assert all(placement.under_replicated for placement in described.placement)
    assert all(placement.leader not in (None, leader) for placement in described.placement)
    new_leader = int(next(p["leader"] for p in await _partitions(cluster.bootstrap, topic) if p["partition"] == 0))  # type: ignore[call-overload]
    assert new_leader != leader

    cluster.node(leader).start(timeout=120)
    _poll_status(cluster, lambda s: all(n.up for n in s.nodes) and s.under_replicated == 0)
    [described] = await describe_topics(settings, [ORDERS])
    assert not any(placement.under_replicated for placement in described.placement)


async def _read_committed(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", isolation_level="read_committed"
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        deadline = time.monotonic() + DEADLINE_S
        while len(values) < count:
            assert time.monotonic() < deadline, f"read {len(values)} of {count}"
            batches = await consumer.getmany(timeout_ms=500)
            values += [record.value for records in batches.values() for record in records if record.value]
    finally:
        await consumer.stop()
    return values


def test_stop_stops_every_node(tmp_path: Path) -> None:
    local = LocalCluster(BrokerSettings(port=free_port(), run_dir=tmp_path / "broker", heap="256m", nodes=3))
    try:
        local.start(timeout=180)
        assert all(node.pid() is not None for node in local.nodes)
    finally:
        assert local.stop()
    assert all(node.pid() is None for node in local.nodes)
    # The layout stays: a later start, even without --nodes, brings the same cluster back.
    again = LocalCluster(BrokerSettings(port=free_port(), run_dir=tmp_path / "broker"))
    assert again.size == 3

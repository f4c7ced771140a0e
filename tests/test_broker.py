"""LocalBroker against a real Kafka JVM: lifecycle, durability across restarts, transactions.

These tests start their own broker (not the session one from kafka_fixtures)
because they stop, kill and wipe it; every wait polls against a deadline.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from services.common.broker import BrokerError, BrokerSettings, LocalBroker, PortInUseError
from services.common.broker import node as broker_module
from tests.kafka_fixtures import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

DEADLINE_S = 30.0


def _settings(run_dir: Path, **overrides: object) -> BrokerSettings:
    values: dict[str, object] = {
        "port": free_port(),
        "run_dir": run_dir,
        "heap": "256m",
    }
    values.update(overrides)
    return BrokerSettings.model_validate(values)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    local = LocalBroker(_settings(tmp_path_factory.mktemp("broker-test") / "broker"))
    try:
        local.start(timeout=120)
        yield local
    finally:
        local.stop()


@pytest.fixture
def running(broker: LocalBroker) -> LocalBroker:
    # Tests below stop, kill or wipe the broker; each one starts from a running broker.
    broker.start(timeout=60)
    return broker


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, *values: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


async def _read_until(
    bootstrap: str,
    topic: str,
    done: Callable[[list[bytes]], bool],
    isolation_level: str = "read_uncommitted",
) -> list[bytes]:
    """Read ``topic`` from the start until ``done(values)``; fail at the deadline."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    values: list[bytes] = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not done(values):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out reading {topic}; got {values!r}")
            batches = await consumer.getmany(timeout_ms=500)
            values.extend(record.value for records in batches.values() for record in records)
    finally:
        await consumer.stop()
    return values


@pytest.mark.asyncio
async def test_start_answers_admin_requests(running: LocalBroker) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=running.bootstrap)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    meta = (running.data_dir / "meta.properties").read_text(encoding="utf-8")
    assert f"cluster.id={cluster['cluster_id']}" in meta
    assert [b["port"] for b in cluster["brokers"]] == [running.settings.port]


def test_status_reports_pid_readiness_and_rss(running: LocalBroker) -> None:
    status = running.status()
    assert status.running
    assert status.ready
    assert status.pid == int(running.pid_file.read_text())
    assert status.bootstrap == running.settings.bootstrap
    assert status.rss_bytes is not None
    assert status.rss_bytes > 50 * 1024 * 1024


def test_second_start_is_a_noop(running: LocalBroker) -> None:
    pid = running.status().pid
    result = running.start()
    assert result.already_running
    assert result.pid == pid == running.status().pid
    assert result.elapsed_s < 10


def _assert_stopped(broker: LocalBroker) -> None:
    status = broker.status()
    assert not status.running
    assert not status.ready
    assert status.pid is None
    assert status.rss_bytes is None
    assert not broker.pid_file.exists()
    with socket.socket() as sock:
        assert sock.connect_ex((broker.settings.host, broker.settings.port)) != 0


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_stopped_broker_reports_not_running_and_restart_keeps_records(
    running: LocalBroker, unique_name: Callable[[str], str], how: str
) -> None:
    topic = unique_name("durable")
    await _create_topic(running.bootstrap, topic)
    await _produce(running.bootstrap, topic, b"before-restart")

    # A SIGKILL loses nothing acknowledged with acks=all: the records are in
    # the page cache, which survives the process (only an OS crash would not).
    stopped = await asyncio.to_thread(running.stop if how == "stop" else running.kill)
    assert stopped is True
    _assert_stopped(running)
    assert running.stop() is False  # nothing left to stop
    await asyncio.to_thread(running.start, 60)

    await _produce(running.bootstrap, topic, b"after-restart")
    values = await _read_until(running.bootstrap, topic, lambda v: len(v) >= 2)
    assert values == [b"before-restart", b"after-restart"]


@pytest.mark.asyncio
async def test_transactions_commit_is_visible_and_abort_is_not(
    running: LocalBroker, unique_name: Callable[[str], str]
) -> None:
    bootstrap = running.bootstrap
    source, sink, group = unique_name("in"), unique_name("out"), unique_name("group")
    await _create_topic(bootstrap, source)
    await _create_topic(bootstrap, sink)

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=unique_name("txn"))
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send_and_wait(sink, b"committed")
            await producer.send_offsets_to_transaction({TopicPartition(source, 0): 1}, group)

        await producer.begin_transaction()
        await producer.send_and_wait(sink, b"aborted")
        await producer.send_offsets_to_transaction({TopicPartition(source, 0): 2}, group)
        await producer.abort_transaction()

        # A later commit bounds the read: once it is visible, anything the
        # aborted transaction could have exposed would be visible too.
        async with producer.transaction():
            await producer.send_and_wait(sink, b"last")
    finally:
        await producer.stop()

    committed = await _read_until(bootstrap, sink, lambda v: b"last" in v, isolation_level="read_committed")
    assert committed == [b"committed", b"last"]
    uncommitted = await _read_until(bootstrap, sink, lambda v: b"last" in v)
    assert uncommitted == [b"committed", b"aborted", b"last"]

    # The group's offset comes from the committed transaction only; markers
    # land asynchronously after commit, so poll until the offset is stable.
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            offsets = await admin.list_consumer_group_offsets(group)
            found = offsets.get(TopicPartition(source, 0))
            if found is not None:
                break
            assert time.monotonic() < deadline, f"no committed offset for {group}"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    assert found.offset == 1


def test_wipe_refuses_while_running_and_then_forgets_data(running: LocalBroker) -> None:
    with pytest.raises(BrokerError, match="refusing to wipe"):
        running.wipe()
    meta_before = (running.data_dir / "meta.properties").read_text(encoding="utf-8")
    running.stop()
    running.wipe()
    assert not running.data_dir.exists()
    running.start(timeout=60)
    meta_after = (running.data_dir / "meta.properties").read_text(encoding="utf-8")
    assert meta_after != meta_before  # freshly formatted, new cluster id


def test_start_fails_clearly_when_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        local = LocalBroker(_settings(tmp_path / "broker", port=port))
        with pytest.raises(PortInUseError, match=f"port 127.0.0.1:{port} is already in use"):
            local.start(timeout=10)
    assert not local.pid_file.exists()


def test_port_taken_after_the_check_is_reported_as_port_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulates losing the race between the free-port check and the JVM's
    # bind. The controller port is the one taken: it is bound first, so the
    # JVM gives up sooner than it would over the client port.
    monkeypatch.setattr(broker_module, "_port_free", lambda host, port: True)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        local = LocalBroker(_settings(tmp_path / "broker", controller_port=squatter.getsockname()[1]))
        with pytest.raises(PortInUseError, match="Address already in use"):
            local.start(timeout=60)
    assert not local.status().running


def test_start_fails_with_log_tail_when_jvm_exits(tmp_path: Path) -> None:
    local = LocalBroker(_settings(tmp_path / "broker", heap="1k"))
    with pytest.raises(BrokerError, match="exited during start-up") as info:
        local.start(timeout=60)
    # The JVM's own complaint, from logs/kafka.out, is part of the error.
    assert "heap" in str(info.value).lower()
    assert not local.status().running


def test_a_node_that_died_before_its_wait_says_why(tmp_path: Path) -> None:
    # Given a node launched without waiting (as a cluster launches its nodes), whose JVM exits at once
    local = LocalBroker(_settings(tmp_path / "broker", heap="1k"))
    launched = local.start(timeout=60, wait=False)
    deadline = time.monotonic() + 60
    while broker_module._pid_alive(launched.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    # When its readiness is awaited, then the error is the JVM's exit and its reason, not "not running"
    with pytest.raises(BrokerError, match="exited during start-up") as info:
        local.wait_ready(10)
    assert "heap" in str(info.value).lower()

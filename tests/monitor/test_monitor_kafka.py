"""The monitor against the real broker: health alerts, the SLA, aborted audit records and the read side."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime

import pytest
from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka

from schemas.topics import AUDIT
from services.cli.monitor_cmd import add_monitor_commands
from services.common.settings import ChoreoSettings
from services.monitor import app as monitor_app
from services.monitor.domain import PendingAlert
from services.monitor.probes import LogProbe
from tests.monitor.factories import completed, placed, saga
from tests.monitor.support import (
    ControlledService,
    alerts,
    audit_writer,
    monitor_settings,
    publish_audit,
    running_monitor,
    write_aborted,
)
from tests.support import committed_offsets, end_offsets, eventually, read_topic

INTERVAL = 1.0


async def test_a_stopped_service_is_degraded_within_two_intervals_and_recovers_after_restart(
    choreo_settings: ChoreoSettings,
) -> None:
    service = ControlledService()
    await service.start()
    settings = monitor_settings(choreo_settings, monitor_interval=INTERVAL, monitor_targets={"svc": service.url})
    try:
        async with running_monitor(settings) as (_, client):
            await eventually(client.services, lambda rows: rows.get("svc", {}).get("status") == "healthy")

            await service.stop()
            stopped_at = time.monotonic()
            degraded = await eventually(
                client.services, lambda rows: rows["svc"]["status"] == "degraded", timeout=2 * INTERVAL, interval=0.05
            )
            assert time.monotonic() - stopped_at <= 2 * INTERVAL
            assert degraded["svc"]["consecutive_failures"] >= 2
            assert "Connect" in (degraded["svc"]["last_error"] or "")

            await service.start()
            recovered = await eventually(
                client.services, lambda rows: rows["svc"]["status"] == "healthy", timeout=2 * INTERVAL, interval=0.05
            )
            checks = recovered["svc"]["check_count"]
            # Some checks later, still exactly one alert per change.
            await eventually(client.services, lambda rows: rows["svc"]["check_count"] >= checks + 2, timeout=10)
            raised = await alerts(settings)
            assert [(a.type, a.order_id) for a in raised] == [
                ("ServiceDegraded", "service:svc"),
                ("ServiceRecovered", "service:svc"),
            ]
            assert raised[0].data.model_dump()["consecutive_failures"] == settings.monitor_failure_threshold
    finally:
        await service.stop()


async def test_a_stuck_saga_is_flagged_exactly_once_and_a_finished_one_never(
    choreo_settings: ChoreoSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    sla = 3.0
    settings = monitor_settings(choreo_settings, monitor_saga_sla=sla, monitor_targets={})
    async with running_monitor(settings) as (_, client):
        now = datetime.now(UTC)
        stuck_then_done = saga("STUCK-THEN-DONE", now, finish=False)
        await publish_audit(settings, [*saga("OPEN", now, finish=False), *saga("DONE", now), *stuck_then_done])
        await eventually(client.stuck, lambda doc: doc.get("open") == 2 and doc["latency"]["finished"] == 1)

        flagged = await eventually(client.stuck, lambda doc: len(doc["stuck"]) == 2, timeout=sla * 5)
        assert sorted(row["order_id"] for row in flagged["stuck"]) == ["OPEN", "STUCK-THEN-DONE"]
        await publish_audit(settings, [completed(stuck_then_done[-1])])  # finishes after being flagged
        await eventually(client.stuck, lambda doc: [row["order_id"] for row in doc["stuck"]] == ["OPEN"])

        rounds = (await client.health())["sla_rounds"]
        await eventually(client.health, lambda body: body["sla_rounds"] >= rounds + 4, timeout=sla * 5)
        raised = await alerts(settings)
        assert sorted((a.type, a.order_id) for a in raised) == [
            ("SagaStuck", "OPEN"),
            ("SagaStuck", "STUCK-THEN-DONE"),
        ]
        final = await client.stuck()
        assert final["open"] == 1
        assert final["latency"]["finished"] == 2
        assert final["latency"]["p50_seconds"] is not None

        # `choreo monitor` prints the same, from the topic or from the running monitor.
        parser = argparse.ArgumentParser()
        add_monitor_commands(parser.add_subparsers())
        for argv in (["monitor", "--json"], ["monitor", "--json", "--url", client.base]):
            args = parser.parse_args(argv)
            assert await asyncio.to_thread(args.handler, args, settings) == 0  # the CLI runs its own loop
            printed = json.loads(capsys.readouterr().out)
            assert [row["order_id"] for row in printed["sagas"]["stuck"]] == ["OPEN"]
            assert printed["sagas"]["latency"]["finished"] == 2
        args = parser.parse_args(["monitor"])
        assert await asyncio.to_thread(args.handler, args, settings) == 0
        assert "STUCK OPEN" in capsys.readouterr().out


@pytest.mark.parametrize("consumer", ["monitor", "stock-faust"])
async def test_events_of_an_aborted_audit_transaction_are_not_followed(
    choreo_settings: ChoreoSettings, monkeypatch: pytest.MonkeyPatch, consumer: str
) -> None:
    """faust reads uncommitted records unless exactly_once is on; the monitor's consumer reads committed ones."""
    if consumer == "stock-faust":
        monkeypatch.setattr(
            monitor_app._ReadCommittedConsumerThread,
            "_create_worker_consumer",
            faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer,
        )
    settings = monitor_settings(choreo_settings, monitor_targets={})
    audit = settings.topic(AUDIT)
    async with running_monitor(settings) as (monitor, _):
        async with audit_writer(settings, "aborting-writer") as writer:
            # One partition, so the monitor reads them in this order.
            await write_aborted(writer, settings, placed("GHOST"), partition=0)
            async with writer.transaction():
                await writer.send(audit, placed("REAL").to_bytes(), key=b"REAL", partition=0)
            async with writer.transaction():
                await writer.send(audit, placed("LAST").to_bytes(), key=b"LAST", partition=0)

        async def followed() -> set[str]:
            return {saga.order_id for saga in monitor.sagas()}

        expected = {"REAL", "LAST"} if consumer == "monitor" else {"GHOST", "REAL", "LAST"}
        assert await eventually(followed, lambda orders: "LAST" in orders) == expected


async def test_the_log_probe_finds_a_published_alert_and_sees_what_is_left_to_read(
    choreo_settings: ChoreoSettings,
) -> None:
    settings = monitor_settings(choreo_settings, monitor_targets={})
    async with running_monitor(settings) as (monitor, client):
        since_ms = int(time.time() * 1000) - 1000
        published = placed("X")
        await monitor.ports.send_alert(published)
        probe = LogProbe(settings)
        try:
            assert await probe.alert_published(PendingAlert.of(published, since_ms))
            assert not await probe.alert_published(PendingAlert.of(placed("Y"), since_ms))
            await publish_audit(settings, [placed("Z")])
            await eventually(client.stuck, lambda doc: doc.get("open") == 1)
            partition = next(iter(monitor.engine.processed))
            assert await probe.caught_up(partition, monitor.engine.processed[partition])
            assert not await probe.caught_up(partition, -1)
        finally:
            await probe.close()


async def test_offsets_are_committed_past_transaction_markers_and_aborted_records(
    choreo_settings: ChoreoSettings,
) -> None:
    """The audit service writes transactionally: every commit marker (and an aborted batch) is an offset the
    monitor never sees. Its committed offsets must still reach the end, and nothing pile up meanwhile."""
    settings = monitor_settings(choreo_settings, monitor_targets={})
    audit = settings.topic(AUDIT)
    async with running_monitor(settings) as (monitor, _):
        async with audit_writer(settings, "audit-writer") as writer:
            for number in range(40):
                opened = placed(f"O-{number}")
                if number == 20:
                    await write_aborted(writer, settings, placed("GHOST"), partition=0)
                async with writer.transaction():
                    for envelope in (opened, completed(opened)):
                        await writer.send(audit, envelope.to_bytes(), key=envelope.key, partition=number % 2)
        partitions = [TopicPartition(audit, p) for p in (0, 1)]
        # Past the last record of each partition: only that record's own commit marker lies beyond.
        records = await read_topic(settings, AUDIT)
        last = {tp: max(r.offset for r in records if r.partition == tp.partition) + 1 for tp in partitions}
        assert all(last[tp] < end for tp, end in (await end_offsets(settings, partitions)).items())

        async def committed() -> dict[TopicPartition, int]:
            return await committed_offsets(settings, monitor.app.conf.id, partitions)

        assert await eventually(committed, lambda found: found == last, timeout=30) == last
        consumer = monitor.app.consumer
        assert not [tp for tp in getattr(consumer, "_acked", {}) if tp.topic == audit]

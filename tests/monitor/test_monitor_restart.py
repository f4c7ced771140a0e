"""The monitor's state lives in `monitor.state`: it survives kill -9 and compaction keeps it bounded."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from schemas.envelope import Envelope
from schemas.topics import MONITOR_STATE
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from services.monitor.domain import digest, saga_key, service_key
from services.monitor.reader import read_state
from services.monitor.runner import TOPICS
from services.monitor.views import services_document
from tests.kafka_fixtures import free_port
from tests.monitor.factories import placed, saga
from tests.monitor.support import (
    ControlledService,
    MonitorClient,
    MonitorProcess,
    alerts,
    monitor_settings,
    publish_audit,
    running_monitor,
)
from tests.support import eventually, read_topic

FAST_COMPACTION = {
    "segment.ms": "100",
    "min.cleanable.dirty.ratio": "0.01",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "100",
}


def ids(envelopes: list[Envelope]) -> list[str]:
    return [str(envelope.event_id) for envelope in envelopes]


async def test_kill_9_and_restart_restores_the_state_and_repeats_no_alert(
    choreo_settings: ChoreoSettings, tmp_path: Path
) -> None:
    up = ControlledService()
    await up.start()
    nobody = f"http://127.0.0.1:{free_port()}/health"
    settings = monitor_settings(
        choreo_settings, monitor_interval=0.5, monitor_saga_sla=2.0, monitor_targets={"up": up.url, "down": nobody}
    )
    await ensure_topics(settings, TOPICS)
    now = datetime.now(UTC)
    await publish_audit(settings, [*saga("OPEN", now, finish=False), *saga("DONE", now)])
    monitor = MonitorProcess(settings, tmp_path / "monitor.log")
    client = MonitorClient(settings.health_port)
    try:
        monitor.start()
        await client.wait_ready()
        await eventually(
            client.services,
            lambda rows: (
                rows.get("up", {}).get("status") == "healthy" and rows.get("down", {}).get("status") == "degraded"
            ),
            timeout=20,
        )
        stuck_before = await eventually(
            client.stuck,
            lambda doc: [r["order_id"] for r in doc.get("stuck", [])] == ["OPEN"] and doc["latency"]["finished"] == 1,
            timeout=20,
        )
        seen_before = await client.services()
        alerts_before = await alerts(settings)
        assert sorted((a.type, a.order_id) for a in alerts_before) == [
            ("SagaStuck", "OPEN"),
            ("ServiceDegraded", "service:down"),
        ]

        monitor.kill()
        at_kill = await read_state(settings)
        assert saga_key("OPEN") in at_kill.raw
        assert saga_key("DONE") not in at_kill.raw
        for name, row in seen_before.items():
            assert {h.service: h for h in at_kill.services()}[name].check_count >= row["check_count"]

        monitor.start()
        await client.wait_ready()
        restored = await eventually(
            lambda: asyncio.to_thread(monitor.log_entries, "monitor state restored"),
            lambda entries: len(entries) == 2,
            timeout=30,
        )
        # What the restarted monitor holds before it does anything is exactly what the broker held at the kill.
        assert restored[-1]["records"] == len(at_kill.raw)
        assert restored[-1]["digest"] == digest(at_kill.raw)

        # Its counters carry on from there, its status changes are not raised again.
        counted = {row["service"]: row for row in services_document(at_kill.services())["services"]}
        later = await eventually(
            client.services,
            lambda rows: all(rows[n]["check_count"] >= counted[n]["check_count"] + 3 for n in ("up", "down")),
            timeout=20,
        )
        for name in ("up", "down"):
            assert later[name]["status"] == counted[name]["status"]
            assert later[name]["last_change"] == counted[name]["last_change"]
        assert later["down"]["consecutive_failures"] >= counted["down"]["consecutive_failures"] + 3
        rounds = (await client.health())["sla_rounds"]
        await eventually(client.health, lambda body: body["sla_rounds"] >= rounds + 3, timeout=20)
        stuck_after = await client.stuck()
        assert stuck_after["stuck"][0]["flagged_at"] == stuck_before["stuck"][0]["flagged_at"]
        assert stuck_after["latency"] == stuck_before["latency"]
        assert ids(await alerts(settings)) == ids(alerts_before)
    finally:
        await asyncio.to_thread(monitor.terminate)
        await up.stop()


async def test_after_compaction_the_state_topic_holds_one_record_per_live_key(choreo_settings: ChoreoSettings) -> None:
    up = ControlledService()
    await up.start()
    busy = monitor_settings(choreo_settings, monitor_interval=0.05, monitor_targets={"svc": up.url})
    await ensure_topics(busy, [MONITOR_STATE], config_overrides={MONITOR_STATE.name: FAST_COMPACTION})
    now = datetime.now(UTC)
    finished = [f"DONE-{i}" for i in range(20)]
    still_open = [f"OPEN-{i}" for i in range(5)]
    try:
        async with running_monitor(busy) as (_, client):
            await publish_audit(
                busy,
                [e for order in finished for e in saga(order, now)]
                + [e for order in still_open for e in saga(order, now, finish=False)],
            )
            await eventually(client.stuck, lambda doc: doc.get("open") == 5 and doc["latency"]["finished"] == 20)
            await eventually(client.services, lambda rows: rows.get("svc", {}).get("check_count", 0) >= 40)

        # The active segment of a partition is never compacted, so the cleaner reaches the records above
        # only once newer ones follow them. New orders do that (one per partition; their only record is
        # their own), seen by the monitor restarted with a long interval: one more check of svc, then quiet.
        quiet = busy.model_copy(update={"monitor_interval": 3600.0})
        async with running_monitor(quiet) as (_, client):
            await eventually(client.services, lambda rows: rows["svc"]["check_count"] > 40)
            rolls = 0

            async def roll_and_read() -> list[tuple[str, bool]]:
                nonlocal rolls
                rolls += 1
                orders = [placed(f"NEXT-{rolls}-{p}", now) for p in range(quiet.partitions)]
                await publish_audit(quiet, orders, by_partition=True)
                await eventually(client.stuck, lambda doc: doc.get("open") == 5 + rolls * quiet.partitions)
                return [(r.key.decode(), r.value is None) for r in await read_topic(quiet, MONITOR_STATE)]

            def compacted(records: list[tuple[str, bool]]) -> bool:
                keys = [key for key, _ in records]
                latest = {saga_key(f"NEXT-{rolls}-{p}") for p in range(quiet.partitions)}
                # the in-memory count comes first; the newest records may still be on their way
                arrived = latest <= set(keys)
                return arrived and len(keys) == len(set(keys)) and not any(tombstone for _, tombstone in records)

            records = await eventually(roll_and_read, compacted, timeout=120, interval=0.5)
        live = await read_state(quiet)
        assert sorted(key for key, _ in records) == sorted(live.raw)
        assert {saga_key(order) for order in still_open} | {service_key("svc")} <= set(live.raw)
        assert not {saga_key(order) for order in finished} & {key for key, _ in records}
        assert sum(stats.finished for stats in live.stats()) == len(finished)  # carried over the restart
    finally:
        await up.stop()

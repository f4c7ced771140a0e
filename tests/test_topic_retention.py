"""Every topic's retention, from the settings, on the real broker: set, brought up to date, shown, enforced."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest
from aiokafka.admin import NewTopic

from schemas.topics import (
    ALL_TOPICS,
    AUDIT,
    DEAD_LETTER,
    INVENTORY_STATE,
    LEDGER_REPLIES,
    MONITOR_ALERTS,
    MONITOR_STATE,
    ORDERS,
    PAYMENT_EVENTS,
    SAGA_TOPICS,
    Topic,
)
from services.common.kafka import admin_client, producer
from services.common.settings import ChoreoSettings
from services.common.topics import (
    CHANGELOG_MAX_COMPACTION_LAG,
    CHANGELOG_SEGMENT,
    RetentionSettingsError,
    changelog_delete_retention,
    describe_topics,
    ensure_topics,
    human_ms,
    saga_retention,
)
from tests.support import choreo, eventually, read_topic

DAY_MS = 24 * 3600 * 1000
CHANGELOGS = tuple(topic for topic in ALL_TOPICS if topic.compacted)
# Internal request/reply topics carry a saga's steps like the public saga topics do.
ORDER_RETAINED = tuple(topic for topic in ALL_TOPICS if topic not in (AUDIT, MONITOR_ALERTS, DEAD_LETTER, *CHANGELOGS))


def ms(value: timedelta) -> str:
    return str(value // timedelta(milliseconds=1))


def test_saga_topics_keep_the_order_retention_and_a_day_never_less_than_seven_days() -> None:
    assert saga_retention(ChoreoSettings(order_retention=timedelta(days=7))) == timedelta(days=8)
    assert saga_retention(ChoreoSettings(order_retention=timedelta(days=30))) == timedelta(days=31)
    assert saga_retention(ChoreoSettings(order_retention=timedelta(seconds=60))) == timedelta(days=7)
    followers = {topic.name for topic in ORDER_RETAINED}
    assert {topic.name for topic in SAGA_TOPICS} < followers
    assert LEDGER_REPLIES.name in followers


def test_durations_read_as_the_largest_units_first() -> None:
    assert human_ms(8 * DAY_MS) == "8d"
    assert human_ms(90 * 60 * 1000) == "1h30m"
    assert human_ms(100) == "100ms"
    assert human_ms(0) == "0ms"
    assert human_ms(-1) == "forever"
    assert human_ms(2**63 - 1) == "forever"


async def test_create_on_a_fresh_broker_sets_every_retention(choreo_settings: ChoreoSettings) -> None:
    settings = choreo_settings.model_copy(
        update={"order_retention": timedelta(days=10), "deadletter_retention": timedelta(days=3)}
    )
    await ensure_topics(settings)

    configs = {topic.name: topic.config for topic in await describe_topics(settings)}
    for topic in ORDER_RETAINED:
        assert configs[settings.topic(topic)]["retention.ms"] == str(11 * DAY_MS), topic.name
        assert configs[settings.topic(topic)]["segment.ms"] == str(DAY_MS), topic.name
    assert configs[settings.topic(AUDIT)]["retention.ms"] == str(30 * DAY_MS)
    assert configs[settings.topic(MONITOR_ALERTS)]["retention.ms"] == str(30 * DAY_MS)
    assert configs[settings.topic(DEAD_LETTER)]["retention.ms"] == str(3 * DAY_MS)
    for topic in CHANGELOGS:
        config = configs[settings.topic(topic)]
        assert config["cleanup.policy"] == "compact", topic.name
        assert config["segment.ms"] == ms(CHANGELOG_SEGMENT), topic.name
        assert config["max.compaction.lag.ms"] == ms(CHANGELOG_MAX_COMPACTION_LAG), topic.name
        assert config["min.cleanable.dirty.ratio"] == "0.1", topic.name
        # What the state stores rely on is what the broker applies.
        assert config["delete.retention.ms"] == ms(changelog_delete_retention(settings)), topic.name
        assert "retention.ms" not in config, topic.name


async def test_create_brings_stale_configs_up_to_date_and_says_what_changed(choreo_settings: ChoreoSettings) -> None:
    # As an older release left them: a saga topic with a shorter retention and an operator's own setting,
    # which has to survive the update, and a changelog with nothing but its policy.
    stale = [
        (ORDERS, {"cleanup.policy": "delete", "retention.ms": "3600000", "max.message.bytes": "2000000"}),
        (INVENTORY_STATE, {"cleanup.policy": "compact"}),
    ]
    admin = admin_client(choreo_settings)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(choreo_settings.topic(topic), 6, 1, topic_configs=config) for topic, config in stale]
        )
    finally:
        await admin.close()

    first = choreo(choreo_settings, "topics", "create")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    orders = lines.index(f"updated  {choreo_settings.topic(ORDERS)} (6 partitions)")
    assert lines[orders + 1 : orders + 3] == [
        "           retention.ms: 3600000 (1h) -> 691200000 (8d)",
        "           segment.ms: 604800000 (7d) -> 86400000 (1d)",
    ]
    changelog = lines.index(f"updated  {choreo_settings.topic(INVENTORY_STATE)} (6 partitions)")
    assert lines[changelog + 1 : changelog + 4] == [
        "           segment.ms: 604800000 (7d) -> 3600000 (1h)",
        "           max.compaction.lag.ms: 9223372036854775807 (forever) -> 21600000 (6h)",
        "           min.cleanable.dirty.ratio: 0.5 -> 0.1",
    ]
    # Kafka's default delete.retention.ms is already the one wanted: not reported, not changed.
    assert not lines[changelog + 4].startswith(" ")
    assert lines[-1] == f"{len(ALL_TOPICS) - 2} new, 2 updated, 0 already up to date"

    configs = {topic.name: topic.config for topic in await describe_topics(choreo_settings, [ORDERS, INVENTORY_STATE])}
    assert configs[choreo_settings.topic(ORDERS)]["retention.ms"] == str(8 * DAY_MS)
    assert configs[choreo_settings.topic(ORDERS)]["max.message.bytes"] == "2000000"
    assert configs[choreo_settings.topic(INVENTORY_STATE)]["min.cleanable.dirty.ratio"] == "0.1"

    second = choreo(choreo_settings, "topics", "create")
    assert second.returncode == 0, second.stderr
    assert [line.split()[0] for line in second.stdout.splitlines()[:-1]] == ["ok"] * len(ALL_TOPICS)
    assert second.stdout.splitlines()[-1] == f"nothing changed: all {len(ALL_TOPICS)} topics already up to date"


async def test_a_longer_order_retention_updates_the_topics_that_follow_it(
    choreo_settings: ChoreoSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ensure_topics(choreo_settings)
    monkeypatch.setenv("CHOREO_ORDER_RETENTION", "P14D")

    cli = choreo(choreo_settings, "topics", "create")
    assert cli.returncode == 0, cli.stderr
    updated = {line.split()[1] for line in cli.stdout.splitlines() if line.startswith("updated ")}
    assert updated == {choreo_settings.topic(topic) for topic in ORDER_RETAINED}
    assert cli.stdout.count("retention.ms: 691200000 (8d) -> 1296000000 (15d)") == len(ORDER_RETAINED)

    again = await ensure_topics(choreo_settings.model_copy(update={"order_retention": timedelta(days=14)}), update=True)
    assert not any(topic.changes or topic.created for topic in again)


async def test_a_service_starting_alters_no_existing_config_and_warns(
    choreo_settings: ChoreoSettings, caplog: pytest.LogCaptureFixture
) -> None:
    admin = admin_client(choreo_settings)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(choreo_settings.topic(ORDERS), 6, 1, topic_configs={"retention.ms": "3600000"})]
        )
    finally:
        await admin.close()

    with caplog.at_level(logging.WARNING, logger="services.common.topics"):
        (orders,) = await ensure_topics(choreo_settings, [ORDERS])
    assert orders.changes == ()
    assert orders.config["retention.ms"] == "3600000"
    assert f"topic {choreo_settings.topic(ORDERS)} has retention.ms=3600000, the settings want 691200000" in caplog.text


async def test_an_audit_retention_shorter_than_the_order_retention_is_refused(
    choreo_settings: ChoreoSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = choreo_settings.model_copy(update={"audit_retention": timedelta(days=2)})
    with pytest.raises(RetentionSettingsError, match=r"CHOREO_AUDIT_RETENTION \(2d\) is shorter than"):
        await ensure_topics(short)

    monkeypatch.setenv("CHOREO_AUDIT_RETENTION", "172800")
    cli = choreo(choreo_settings, "topics", "create")
    assert cli.returncode == 2
    assert "choreo: invalid settings: CHOREO_AUDIT_RETENTION (2d) is shorter than CHOREO_ORDER_RETENTION (7d)" in (
        cli.stderr
    )
    assert await describe_topics(choreo_settings) == [], "nothing is created with contradicting settings"


async def test_describe_shows_retention_readably(choreo_settings: ChoreoSettings) -> None:
    await ensure_topics(choreo_settings)

    cli = choreo(choreo_settings, "topics", "describe")
    assert cli.returncode == 0, cli.stderr
    rows = {line.split()[0]: line for line in cli.stdout.splitlines()}
    assert "retention.ms=691200000 (8d)" in rows[choreo_settings.topic(PAYMENT_EVENTS)]
    assert "retention.ms=2592000000 (30d)" in rows[choreo_settings.topic(AUDIT)]
    changelog = rows[choreo_settings.topic(MONITOR_STATE)]
    for shown in (
        "cleanup.policy=compact",
        "segment.ms=3600000 (1h)",
        "max.compaction.lag.ms=21600000 (6h)",
        "min.compaction.lag.ms=0 (0ms)",
        "min.cleanable.dirty.ratio=0.1",
        "delete.retention.ms=86400000 (1d)",
    ):
        assert shown in changelog
    assert "retention.ms=" not in changelog.replace("delete.retention.ms=", "")

    as_json = choreo(choreo_settings, "topics", "describe", "--json")
    documents = {row["name"]: row for row in map(json.loads, as_json.stdout.splitlines())}
    assert documents[choreo_settings.topic(AUDIT)]["config"]["retention.ms"] == str(30 * DAY_MS)


async def _partition_zero(settings: ChoreoSettings, topic: Topic) -> list[tuple[str, str | None]]:
    return [
        (record.key.decode(), None if record.value is None else record.value.decode())
        for record in await read_topic(settings, topic)
        if record.partition == 0
    ]


async def test_a_compacted_changelog_removes_superseded_records_and_tombstones(
    choreo_settings: ChoreoSettings,
) -> None:
    settings = choreo_settings.model_copy(update={"changelog_delete_retention": timedelta(milliseconds=100)})
    # Only the segment size and the dirty ratio are shrunk; the tombstones' lifetime is the setting's.
    fast = {"segment.ms": "100", "min.cleanable.dirty.ratio": "0.01"}
    (described,) = await ensure_topics(settings, [INVENTORY_STATE], config_overrides={INVENTORY_STATE.name: fast})
    assert described.config["delete.retention.ms"] == "100"

    name = settings.topic(INVENTORY_STATE)
    written = [("order:A", "v1"), ("order:A", "v2"), ("order:B", "v1"), ("order:B", None), ("sku:X", "5")]
    client = producer(settings)
    await client.start()
    try:
        for key, value in written:
            await client.send_and_wait(name, None if value is None else value.encode(), key=key.encode(), partition=0)
        assert await _partition_zero(settings, INVENTORY_STATE) == written
        rolls = 0

        async def after_a_roll() -> list[tuple[str, str | None]]:
            # The active segment is never cleaned: a later record rolls it once segment.ms has passed.
            nonlocal rolls
            rolls += 1
            await client.send_and_wait(name, str(rolls).encode(), key=b"roll", partition=0)
            return [entry for entry in await _partition_zero(settings, INVENTORY_STATE) if entry[0] != "roll"]

        # Superseded values go at the first cleaning; the tombstone at a later one, once its 100 ms are up.
        await eventually(
            after_a_roll, lambda entries: entries == [("order:A", "v2"), ("sku:X", "5")], timeout=60, interval=0.3
        )
    finally:
        await client.stop()

"""Finished orders leave every service's state and changelog after the horizon, on the real broker.

The horizon is seconds here (it is 7 days by default); changelogs are compacted within seconds too,
so the test can read back from the broker that nothing of the expired orders is left.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from schemas.deadletter import DeadLetter
from schemas.topics import (
    APPROVAL_STATE,
    AUDIT_STATE,
    DEAD_LETTER,
    INVENTORY_STATE,
    PAYMENT_STATE,
    SHIPPING_STATE,
    Topic,
)
from services.common.publisher import publish
from services.common.saga import order_key
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from tests.e2e.harness import SAGA_SERVICES, SagaStack, audit_by_order, timeline, wait_for_events
from tests.e2e.test_refund_outage import outage
from tests.e2e.test_saga_outcomes import order
from tests.support import eventually, read_topic

HORIZON_S = 8
CHANGELOGS: tuple[Topic, ...] = (INVENTORY_STATE, PAYMENT_STATE, APPROVAL_STATE, SHIPPING_STATE, AUDIT_STATE)
FAST_COMPACTION = {"segment.ms": "100", "min.cleanable.dirty.ratio": "0.01", "max.compaction.lag.ms": "200"}


def overrides(tmp_path: Path, **payment: Any) -> dict[str, dict[str, Any]]:
    common = {"order_retention": timedelta(seconds=HORIZON_S)}
    every = {name: {**common, "state_dir": tmp_path / name, "state_store": "disk"} for name in SAGA_SERVICES}
    every["payment"].update(payment)
    every["approval"]["approval_timeout"] = 3600
    return every


@pytest.fixture
async def settings(choreo_settings: ChoreoSettings) -> ChoreoSettings:
    # Tombstones live 100 ms: what the horizon deletes is gone from the broker at the next cleaning.
    fast = choreo_settings.model_copy(update={"changelog_delete_retention": timedelta(milliseconds=100)})
    await ensure_topics(fast, config_overrides={topic.name: FAST_COMPACTION for topic in CHANGELOGS})
    return fast


@pytest.fixture
async def stack(settings: ChoreoSettings, tmp_path: Path) -> AsyncIterator[SagaStack]:
    running = SagaStack(settings, overrides(tmp_path))
    try:
        yield running
    finally:
        await running.stop(*list(running.runners))


def live_keys_of(stack: SagaStack, order_ids: set[str]) -> dict[str, list[str]]:
    """Keys of `order_ids` that some running service still holds."""
    found: dict[str, list[str]] = {}
    for name, runner in stack.runners.items():
        for partition in runner.partitions:
            keys = [key for key in runner.store(partition).keys("") if any(o in key for o in order_ids)]
            if keys:
                found.setdefault(name, []).extend(keys)
    return found


async def changelog_keys(settings: ChoreoSettings, order_ids: set[str]) -> dict[str, int]:
    """Records (values or tombstones) still on the broker whose key names one of `order_ids`."""
    counts: dict[str, int] = {}
    for topic in CHANGELOGS:
        records = await read_topic(settings, topic)
        hits = sum(1 for record in records if any(o in record.key.decode() for o in order_ids))
        if hits:
            counts[topic.name] = hits
    return counts


async def gone_from_the_broker(settings: ChoreoSettings, order_ids: set[str], filler: str) -> None:
    """Poll until compaction removed every record of `order_ids` from every changelog.

    The active segment is never cleaned, so each poll places one more order: its records roll the
    segments that hold the expired ones."""
    rolls = 0

    async def probe() -> dict[str, int]:
        nonlocal rolls
        rolls += 1
        await publish(settings, [order(f"{filler}-{rolls}")])
        return await changelog_keys(settings, order_ids)

    await eventually(probe, lambda counts: counts == {}, timeout=90, interval=0.5)


async def dead_letters_for(settings: ChoreoSettings, order_id: str) -> list[DeadLetter]:
    return [
        letter
        for letter in (
            DeadLetter.model_validate_json(record.value) for record in await read_topic(settings, DEAD_LETTER)
        )
        if record_key(letter) == order_id
    ]


def record_key(letter: DeadLetter) -> str | None:

    return base64.b64decode(letter.key_base64).decode() if letter.key_base64 else None


async def test_finished_orders_leave_state_and_changelogs_and_late_input_is_dead_lettered(
    stack: SagaStack, settings: ChoreoSettings, tmp_path: Path
) -> None:
    await stack.start()
    completed, rejected, declined = (
        order("o-done"),
        order("o-short", sku="NO-SUCH-SKU"),
        order("o-poor", customer="no-credit"),
    )
    await publish(settings, [completed, rejected, declined])
    for order_id in ("o-done", "o-short", "o-poor"):
        await wait_for_events(settings, order_id, "OrderCompleted" if order_id == "o-done" else "OrderCancelled")
    done_timeline = await timeline(settings, "o-done")

    # Inside the horizon a duplicate is deduplicated: no second saga, nothing dead-lettered.
    await publish(settings, [completed])
    await stack.settle()
    assert await timeline(settings, "o-done") == done_timeline
    assert await dead_letters_for(settings, "o-done") == []

    ended = {"o-done", "o-short", "o-poor"}
    await eventually(lambda: _async(live_keys_of(stack, ended)), lambda found: found == {}, timeout=30)
    await gone_from_the_broker(settings, ended, "o-filler")

    # After it, the same duplicate is dead-lettered with its reason and starts nothing.
    await publish(settings, [completed])
    letters = await eventually(
        lambda: dead_letters_for(settings, "o-done"),
        lambda found: {letter.consumer for letter in found} >= {"inventory", "audit"},
        timeout=30,
    )
    assert all(letter.reason.startswith("expired: OrderPlaced for order 'o-done'") for letter in letters)
    await stack.settle()
    assert await timeline(settings, "o-done") == done_timeline
    assert live_keys_of(stack, ended) == {}

    # A restart after expiry restores only live state, from the local checkpoints. (With tombstones
    # kept 100 ms, every checkpoint would be too old to trust: back to the default day.)
    await ensure_topics(settings.model_copy(update={"changelog_delete_retention": timedelta(days=1)}), update=True)
    before = {name: _state_of(stack, name) for name in SAGA_SERVICES}
    await stack.stop(*SAGA_SERVICES)
    await stack.start()
    for name in SAGA_SERVICES:
        runner = stack.runners[name]
        assert runner.stats.full_restores == 0, name
        # Filler orders may expire meanwhile; nothing else changes and nothing comes back.
        assert _state_of(stack, name).items() <= before[name].items(), name

    # Without its store folder, a service restores in full from the changelog, to the same state.
    before_wipe = _state_of(stack, "inventory")
    await stack.stop("inventory")
    shutil.rmtree(tmp_path / "inventory")
    await stack.start("inventory")
    assert stack.runners["inventory"].stats.full_restores == len(stack.runners["inventory"].partitions)
    after_wipe = _state_of(stack, "inventory")
    assert after_wipe.items() <= before_wipe.items()
    assert any(key.startswith("sku:") for key in after_wipe), "the stock levels came back from the changelog"


async def test_a_refund_still_being_retried_is_not_expired(settings: ChoreoSettings, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    down = outage(now - timedelta(seconds=1), now + timedelta(seconds=3 * HORIZON_S))
    stack = SagaStack(settings, overrides(tmp_path, **down))
    try:
        await stack.start()
        await publish(settings, [order("o-refund", country="AQ")])
        await wait_for_events(settings, "o-refund", "PaymentRefundFailed")
        # Twice the horizon with the refund failing: payment keeps the order, and so does inventory,
        # which still holds its stock.
        await eventually(
            lambda: _async(stack.runners["payment"].stats.expired_keys),
            lambda expired: expired > 0 or datetime.now(UTC) > now + timedelta(seconds=2 * HORIZON_S),
            timeout=30,
        )
        assert datetime.now(UTC) < now + timedelta(seconds=3 * HORIZON_S), "the outage ended before the check"
        held = live_keys_of(stack, {"o-refund"})
        assert order_key("o-refund") in held["payment"]
        assert order_key("o-refund") in held["inventory"]
        assert "OrderCancelled" not in await timeline(settings, "o-refund")

        # Once the provider is back, the refund goes through once, the order ends, and then expires.
        await wait_for_events(settings, "o-refund", "OrderCancelled", timeout=60)
        events = (await audit_by_order(settings))["o-refund"]
        assert [e.type for e in events].count("PaymentRefunded") == 1
        await eventually(lambda: _async(live_keys_of(stack, {"o-refund"})), lambda found: found == {}, timeout=30)
    finally:
        await stack.stop(*list(stack.runners))


def _state_of(stack: SagaStack, name: str) -> dict[str, str]:
    runner = stack.runners[name]
    state: dict[str, str] = {}
    for partition in runner.partitions:
        store = runner.store(partition)
        for key in store.keys(""):
            raw, expires_at = store._lookup(key)
            state[key] = f"{raw!r} until {expires_at}"
    return state


async def _async(value: Any) -> Any:
    return value

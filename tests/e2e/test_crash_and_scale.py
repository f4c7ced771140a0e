"""Hundreds of orders in flight while a service process is SIGKILLed: every saga still ends exactly once.

The services run as real processes on the session's broker. A seeded RNG picks the order mix, the
cancellation moments, the victim and the moment it dies (set CHOREO_TEST_SEED to replay a run; the
seed is in every failure message). Once every order has its terminal event on audit, the test waits
(with a deadline) for the invariants, sends one barrier order per partition through the whole saga
and then checks everything again: audit timelines per order, stock per SKU and credit per customer
as read back from the services' changelogs, and the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.common.settings import ChoreoSettings
from tests.support import eventually
from tests.workload import (
    SERVICES,
    crash,
    describe,
    ownership,
    pick_service,
    plan_orders,
    schedule,
    send_scheduled,
    settle_and_verify,
    shared_by_all,
    start_run,
)

pytestmark = pytest.mark.slow


async def test_a_service_killed_mid_stream_and_restarted(choreo_settings: ChoreoSettings, tmp_path: Path) -> None:
    run = await start_run(choreo_settings, tmp_path)
    timeline, rng, stack = run.timeline, run.rng, run.stack
    try:
        await stack.start(SERVICES)
        timeline.note("all five services healthy")
        run.orders = plan_orders(rng, 520, "crash")
        duration = 15.0
        sends = schedule(rng, run.orders, duration)
        victim = stack.instances(pick_service(rng))[0]
        kill_at = rng.uniform(0.2, 0.8) * duration
        downtime = rng.uniform(0.2, 3.0)
        timeline.note(
            f"{describe(run.orders, duration)}; will SIGKILL {victim.label} at +{kill_at:.2f} s "
            f"and restart it {downtime:.2f} s later"
        )
        sending = asyncio.create_task(send_scheduled(choreo_settings, sends))
        await asyncio.sleep(kill_at)
        await crash(victim, timeline)
        await asyncio.sleep(downtime)
        body = await stack.restart(victim)
        timeline.note(f"{victim.label} restarted and healthy: {body}")
        run.sent = await sending
        timeline.note("every order and cancellation sent")
        await settle_and_verify(run, settle_timeout=120)
    finally:
        stack.close()


async def test_two_instances_each_one_killed_for_good(choreo_settings: ChoreoSettings, tmp_path: Path) -> None:
    run = await start_run(choreo_settings, tmp_path)
    timeline, rng, stack = run.timeline, run.rng, run.stack
    try:
        await stack.start(SERVICES, instances=2)
        every = set(range(choreo_settings.partitions))
        for name in SERVICES:
            await eventually(
                lambda name=name: stack.partitions_by_instance(name),  # type: ignore[misc]
                lambda owners: shared_by_all(owners, every),
                timeout=60,
            )
        timeline.note(f"two instances of each service share the partitions: {await ownership(stack)}")
        run.orders = plan_orders(rng, 320, "scale")
        duration = 10.0
        sends = schedule(rng, run.orders, duration)
        name = pick_service(rng)
        victim, survivor = rng.sample(stack.instances(name), 2)
        kill_at = rng.uniform(0.2, 0.8) * duration
        timeline.note(f"{describe(run.orders, duration)}; will SIGKILL {victim.label} for good at +{kill_at:.2f} s")
        sending = asyncio.create_task(send_scheduled(choreo_settings, sends))
        await asyncio.sleep(kill_at)
        await crash(victim, timeline)
        killed_at = time.monotonic()
        owned = await eventually(
            lambda: stack.partitions_by_instance(name),
            lambda owners: owners[survivor.label] == list(range(choreo_settings.partitions)),
            timeout=60,
        )
        timeline.note(f"{survivor.label} took over every partition {time.monotonic() - killed_at:.1f} s later: {owned}")
        run.sent = await sending
        timeline.note("every order and cancellation sent")
        await settle_and_verify(run, settle_timeout=120)
    finally:
        stack.close()

"""A payment instance frozen past its session while orders flow: the zombie must not corrupt anything.

Two payment instances share the partitions. One is SIGSTOPped mid-stream and kept frozen until its
consumer session has expired and the other instance owns every partition (and has started the
tasks' transactional producers, which fences the frozen one). Then it is SIGCONTed with whatever
batch or open transaction it was holding. It may either find out it was fenced and exit non-zero
(a supervisor then restarts it, as the test does), or notice the rebalance first and rejoin the
group cleanly; both are fine. What must hold either way: no event twice on audit, exactly one
terminal event per order, stock and money conserved.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from services.common.settings import ChoreoSettings
from tests.e2e.processes import ServiceProcess
from tests.support import eventually
from tests.workload import (
    SERVICES,
    assignments,
    describe,
    freeze,
    owned_by,
    plan_orders,
    schedule,
    send_scheduled,
    settle_and_verify,
    shared_by_all,
    start_run,
    zombie_fate,
)

ORDERS = 150
STREAM_S = 24.0
# aiokafka's default session timeout is 10 s; the takeover needs that plus a rebalance.
TAKEOVER_TIMEOUT_S = 45.0
FATE_TIMEOUT_S = 30.0


@pytest.mark.slow
async def test_a_payment_instance_frozen_past_its_session_is_fenced_or_rejoins(
    choreo_settings: ChoreoSettings, tmp_path: Path
) -> None:
    run = await start_run(choreo_settings, tmp_path)
    timeline, rng, stack = run.timeline, run.rng, run.stack
    every = list(range(choreo_settings.partitions))
    zombie: ServiceProcess | None = None
    try:
        await stack.start((*SERVICES, "payment"))
        await eventually(lambda: stack.partitions_by_instance("payment"),
                         lambda owners: shared_by_all(owners, set(every)), timeout=60)  # fmt: skip
        timeline.note(f"two payment instances share the partitions: {await stack.partitions_by_instance('payment')}")

        run.orders = plan_orders(rng, ORDERS, "zombie")
        sends = schedule(rng, run.orders, STREAM_S)
        zombie, survivor = rng.sample(stack.instances("payment"), 2)
        stop_at = rng.uniform(0.1, 0.25) * STREAM_S
        timeline.note(f"{describe(run.orders, STREAM_S)}; will SIGSTOP {zombie.label} at +{stop_at:.2f} s")
        sending = asyncio.create_task(send_scheduled(choreo_settings, sends))
        await asyncio.sleep(stop_at)

        answer = await zombie.health()
        freeze(zombie, signal.SIGSTOP)
        stopped_at = time.monotonic()
        timeline.note(
            f"SIGSTOPped {zombie.label} (pid {zombie.pid}); its last /health: {answer[1] if answer else None}"
        )
        # A frozen process accepts the connection but never answers, so only the survivor is asked.
        await eventually(lambda: owned_by(survivor), lambda owned: owned == every,
                         timeout=TAKEOVER_TIMEOUT_S, interval=0.5)  # fmt: skip
        timeline.note(f"{survivor.label} owns every partition {time.monotonic() - stopped_at:.1f} s after the SIGSTOP")
        assigned_before = assignments(zombie)
        freeze(zombie, signal.SIGCONT)
        timeline.note(f"SIGCONTed {zombie.label} after {time.monotonic() - stopped_at:.1f} s frozen")

        fate = await zombie_fate(stack, zombie, timeline, assigned_before, timeout=FATE_TIMEOUT_S)
        if fate == "fenced":
            body = await stack.restart(zombie)
            timeline.note(f"{zombie.label} restarted as its supervisor would, healthy: {body}")

        run.sent = await sending
        timeline.note("every order and cancellation sent")
        await settle_and_verify(run, settle_timeout=60)
        timeline.note(f"done in {timeline.elapsed():.1f} s; the zombie {fate}")
    finally:
        if zombie is not None and zombie.alive():
            freeze(zombie, signal.SIGCONT)  # a frozen process would ignore the SIGTERM of close()
        stack.close()

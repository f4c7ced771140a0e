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
import os
import signal
import time
from pathlib import Path
from typing import Literal

import pytest

from services.common.settings import ChoreoSettings
from tests.e2e.processes import ProcessStack, ServiceProcess
from tests.e2e.test_crash_and_scale import (
    SERVICES,
    Timeline,
    plan_orders,
    schedule,
    send_scheduled,
    settle_and_verify,
    shared_by_all,
    start_run,
)
from tests.support import eventually

ORDERS = 150
STREAM_S = 24.0
# aiokafka's default session timeout is 10 s; the takeover needs that plus a rebalance.
TAKEOVER_TIMEOUT_S = 45.0
FATE_TIMEOUT_S = 30.0
FENCED_MARK = "TaskFencedError"
ASSIGNED_MESSAGE = "partitions assigned"

Fate = Literal["fenced", "rejoined"]


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
        timeline.note(
            f"{len(run.orders)} orders ({sum(1 for o in run.orders if o.cancel)} with a cancellation) over "
            f"{STREAM_S:.0f} s; will SIGSTOP {zombie.label} at +{stop_at:.2f} s"
        )
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

        fate = await zombie_fate(stack, zombie, timeline, assigned_before)
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


def freeze(process: ServiceProcess, signum: signal.Signals) -> None:
    assert process.pid is not None, f"{process.label} was never started"
    os.kill(process.pid, signum)
    process.history.append(f"{time.strftime('%H:%M:%S')} {signum.name} pid {process.pid}")


async def owned_by(process: ServiceProcess) -> list[int] | None:
    answer = await process.health()
    return list(answer[1].get("partitions", [])) if answer is not None and answer[0] == 200 else None


def assignments(process: ServiceProcess) -> int:
    return sum(1 for record in process.log_records() if record.get("message") == ASSIGNED_MESSAGE)


async def zombie_fate(stack: ProcessStack, zombie: ServiceProcess, timeline: Timeline, assigned_before: int) -> Fate:
    """Poll until the resumed instance has exited non-zero (fenced) or got a new assignment and shares the partitions.

    Right after SIGCONT its /health still lists the partitions it owned before the freeze; only a
    fresh "partitions assigned" in its log says it went through a rebalance since.
    """
    every = set(range(stack.settings.partitions))
    deadline = time.monotonic() + FATE_TIMEOUT_S
    owners: dict[str, list[int]] = {}
    while True:
        assert zombie.popen is not None
        code = zombie.popen.poll()
        if code is not None:
            zombie.expected_down = True
            tail = zombie.log_tail(40)
            assert code != 0, f"{zombie.label} exited cleanly although nobody stopped it; log tail:\n{tail}"
            # The traceback is followed by the exit's noise (aborted sends, unclosed producers): read it all.
            assert zombie.log_file is not None
            fenced = [line for line in zombie.log_file.read_text(errors="replace").splitlines() if FENCED_MARK in line]
            assert fenced, f"{zombie.label} exited with {code} but its log never names {FENCED_MARK}; log tail:\n{tail}"
            timeline.note(f"{zombie.label} exited with {code}: fenced ({fenced[-1].strip()[:160]})")
            return "fenced"
        owners = await stack.partitions_by_instance("payment")
        if shared_by_all(owners, every) and zombie.alive() and assignments(zombie) > assigned_before:
            timeline.note(f"{zombie.label} rejoined cleanly: {owners}")
            return "rejoined"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{zombie.label} neither exited nor rejoined within {FATE_TIMEOUT_S} s (owners {owners}); "
                f"log tail:\n{zombie.log_tail(40)}\n{timeline}\n{stack.report()}"
            )
        await asyncio.sleep(0.3)

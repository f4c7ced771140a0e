"""The whole stack on its own broker under a steady order load while faults are injected one after another.

After the last fault the load stops, every order must end and these invariants must hold, read from
the audit topic and the services' changelogs:

- I1: every order ends in exactly one terminal event;
- I2: stock is conserved (available + reserved = initial - shipped, nothing left reserved) and so is
  money (charged - refunded = the totals of completed orders, per customer);
- I3: the audit topic holds each transition once, and each order's compensations run in reverse
  order of its completed steps;

plus what each scenario checks for itself (see `scenarios.py`). The report (orders, faults with their
times and time to recover, violations, outcomes) is printed at the end of the session and written to
`fault-report.txt` in the test's tmp dir. CHOREO_FAULTS=full (`make faults`) runs every fault several
times at a higher rate; the default is one pass of each.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.common.broker import LocalBroker
from services.common.settings import ChoreoSettings
from tests.faults.harness import REPORTS, FaultRun, Profile
from tests.faults.scenarios import monitor_alerts_once, plan
from tests.workload import run_violations, settle_and_verify

PROFILE = Profile.chosen()


@pytest.mark.slow
@pytest.mark.timeout(PROFILE.timeout_s)
async def test_invariants_hold_under_every_fault(
    fault_settings: ChoreoSettings, fault_broker: LocalBroker, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    run = FaultRun(fault_settings, fault_broker, tmp_path, PROFILE)
    run.final_checks.append(lambda: monitor_alerts_once(run))
    started = time.monotonic()
    found: list[str] | None = None
    try:
        await run.start()
        for _ in range(PROFILE.rounds):
            for scenario in plan(run):
                await run.pause()
                await scenario()
        await run.load.stop()
        run.timeline.note(f"load stopped after {len(run.orders)} orders")
        await settle_and_verify(run, settle_timeout=180)
        found = await run.scenario_violations()
        assert not found, f"{len(found)} violations:\n" + "\n".join(found) + f"\n{run.timeline}"
    finally:
        if found is None:  # the run stopped before its own checks: count what is broken now
            try:
                found = [*await run_violations(run), *await run.scenario_violations()]
            except Exception as error:  # the broker may be the thing that failed
                found = [f"could not read the final state: {error!r}"]
        report = await run.report(started, found)
        request.config.stash.setdefault(REPORTS, []).append(report)
        await run.close()

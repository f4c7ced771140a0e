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

from pathlib import Path

import pytest

from services.common.broker import LocalBroker
from services.common.settings import ChoreoSettings
from tests.faults.harness import FaultRun, Profile, inject_and_verify
from tests.faults.scenarios import monitor_alerts_once, plan

PROFILE = Profile.chosen()


@pytest.mark.slow
@pytest.mark.timeout(PROFILE.timeout_s)
async def test_invariants_hold_under_every_fault(
    fault_settings: ChoreoSettings, fault_broker: LocalBroker, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    run = FaultRun(fault_settings, fault_broker, tmp_path, PROFILE)
    run.final_checks.append(lambda: monitor_alerts_once(run))
    await inject_and_verify(run, plan, request, "one broker")

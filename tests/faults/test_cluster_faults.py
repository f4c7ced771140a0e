"""The whole stack on a three-node cluster (replication 3, min.insync.replicas 2) under a steady order load,
while nodes fail: the leader of a busy partition, the coordinator of a service's transactions and the active
controller are killed and restarted, and two nodes go down at once (`CHOREO_FAULTS=full` adds a node frozen
past the replica lag and session timeouts, and a rolling restart of all three).

Besides I1-I3 (see `test_faults.py`) it checks I4: no acknowledged write is lost. Every client command the
publisher saw acknowledged is on its topic, and every acknowledged order reaches a terminal event. The report
gives, per fault, the errors the services logged and how they recovered.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from services.common.broker import LocalCluster
from services.common.settings import ChoreoSettings
from tests.faults.cluster_scenarios import acknowledged_writes_lost, cluster_plan
from tests.faults.harness import REPORTS, FaultRun, Profile
from tests.workload import run_violations, settle_and_verify

PROFILE = Profile.chosen()


@pytest.mark.slow
@pytest.mark.timeout(PROFILE.timeout_s)
async def test_invariants_hold_when_cluster_nodes_fail(
    fault_cluster: LocalCluster, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    settings = ChoreoSettings(
        bootstrap_servers=fault_cluster.bootstrap,
        topic_prefix="cluster.",
        environment="test",
        replication_factor=fault_cluster.replication,
    )
    run = FaultRun(settings, fault_cluster, tmp_path, PROFILE)
    run.final_checks.append(lambda: acknowledged_writes_lost(run))
    full = os.environ.get("CHOREO_FAULTS", "").strip().lower() == "full"
    started = time.monotonic()
    found: list[str] | None = None
    try:
        await run.start()
        for _ in range(PROFILE.rounds):
            for scenario in cluster_plan(run, full=full):
                await run.pause()
                await scenario()
        await run.load.stop()
        run.timeline.note(f"load stopped after {len(run.orders)} orders")
        await settle_and_verify(run, settle_timeout=180)
        found = await run.scenario_violations()
        assert not found, f"{len(found)} violations:\n" + "\n".join(found) + f"\n{run.timeline}"
    finally:
        if found is None:
            try:
                found = [*await run_violations(run), *await run.scenario_violations()]
            except Exception as error:  # the cluster may be the thing that failed
                found = [f"could not read the final state: {error!r}"]
        report = await run.report(started, found)
        request.config.stash.setdefault(REPORTS, []).append("cluster pass\n" + report)
        await run.close()

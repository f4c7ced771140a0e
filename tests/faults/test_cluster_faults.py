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
from pathlib import Path

import pytest

from services.common.broker import LocalCluster
from services.common.settings import ChoreoSettings
from tests.faults.cluster_scenarios import acknowledged_writes_lost, cluster_plan
from tests.faults.harness import FaultRun, Profile, inject_and_verify

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
    await inject_and_verify(run, lambda run: cluster_plan(run, full=full), request, "three-node cluster")

"""The fault suite's own broker (it kills it) and the run reports printed at the end of the session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from services.common.broker import BrokerSettings, LocalBroker, LocalCluster
from services.common.settings import ChoreoSettings
from tests.faults.harness import REPORTS
from tests.kafka_fixtures import _start_local_broker, free_port

CLUSTER_NODES = 3
# Three JVMs beside the stack on a 2-core machine: each gets less than the single broker's 512 MiB.
CLUSTER_NODE_HEAP = "384m"


@pytest.fixture
def fault_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A broker of this test alone, on free ports in a tmp dir: killing it cannot hurt any other test."""
    broker = _start_local_broker(tmp_path_factory)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def fault_settings(fault_broker: LocalBroker) -> ChoreoSettings:
    return ChoreoSettings(bootstrap_servers=fault_broker.bootstrap, topic_prefix="faults.", environment="test")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for report in terminalreporter.config.stash.get(REPORTS, []):
        terminalreporter.section("fault injection report")
        for line in report.splitlines():
            terminalreporter.write_line(line)


@pytest.fixture
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster of this test alone (CHOREO_FAULTS_CLUSTER nodes, 3 by default), on free ports in a tmp dir."""
    nodes = int(os.environ.get("CHOREO_FAULTS_CLUSTER", "").strip() or CLUSTER_NODES)
    run_dir = tmp_path_factory.mktemp("kafka-cluster") / "broker"
    cluster = LocalCluster(BrokerSettings(port=free_port(), run_dir=run_dir, heap=CLUSTER_NODE_HEAP, nodes=nodes))
    try:
        cluster.start(timeout=180)
        yield cluster
    finally:
        cluster.stop()

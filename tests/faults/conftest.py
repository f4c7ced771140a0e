"""The fault suite's own broker (it kills it) and the run reports printed at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.common.broker import LocalBroker
from services.common.settings import ChoreoSettings
from tests.faults.harness import REPORTS
from tests.kafka_fixtures import _start_local_broker


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

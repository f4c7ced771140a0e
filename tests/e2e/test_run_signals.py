"""`choreo run` stops on SIGINT or SIGTERM however it was started, and restarts nothing on the way out.

Started with `cmd &` from a script, a process inherits SIGINT ignored. The services install their
own handlers, so a SIGINT to the process group stops them; the supervisor must stop too instead of
restarting them.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.settings import ChoreoSettings
from services.common.stack import STOP_TIMEOUT_S, available_services
from services.common.topics import ensure_topics
from tests.e2e.choreo_run import ChoreoRun, alive

# The services stop within a few seconds; the supervisor gives each one STOP_TIMEOUT_S before SIGKILL.
EXIT_DEADLINE_S = STOP_TIMEOUT_S + 15


@pytest.fixture
def choreo_run(tmp_path: Path, choreo_settings: ChoreoSettings) -> Iterator[ChoreoRun]:
    run = ChoreoRun(choreo_settings, tmp_path / "choreo-run.log")
    try:
        yield run
    finally:
        run.close()


async def stop_and_watch(run: ChoreoRun, send: str, signum: int) -> None:
    """Send `signum` to the group or the supervisor alone; assert a clean, complete, restart-free stop."""
    services = run.services()
    assert sorted(services.values()) == sorted(available_services()), services
    seen: dict[int, str] = {}

    def watch() -> None:
        seen.update(run.services())

    if send == "group":
        run.signal_group(signum)
    else:
        run.signal_supervisor(signum)
    code = run.wait_exit(EXIT_DEADLINE_S, watch=watch)

    assert code == 0, run.tail()
    restarted = {pid: name for pid, name in seen.items() if pid not in services}
    assert restarted == {}, f"restarted while stopping: {restarted}\n{run.tail()}"
    assert [pid for pid in services if alive(pid)] == [], run.tail()
    # Only a stop: the supervisor reported no service exit as a crash to restart from.
    supervisor = [record for record in run.records() if record.logger == "services.common.stack"]
    assert [record.message for record in supervisor if record.level == "ERROR"] == []
    assert any(record.message == f"{signal.Signals(signum).name} received; stopping the stack" for record in supervisor)


@pytest.mark.slow
async def test_sigint_to_the_group_stops_a_stack_started_with_sigint_ignored(
    choreo_run: ChoreoRun, choreo_settings: ChoreoSettings
) -> None:
    await ensure_topics(choreo_settings)
    choreo_run.start(ignore_sigint=True)
    await choreo_run.wait_healthy()

    await stop_and_watch(choreo_run, "group", signal.SIGINT)


@pytest.mark.slow
async def test_sigterm_to_the_supervisor_alone_stops_every_service(
    choreo_run: ChoreoRun, choreo_settings: ChoreoSettings
) -> None:
    await ensure_topics(choreo_settings)
    choreo_run.start(ignore_sigint=True)
    await choreo_run.wait_healthy()

    await stop_and_watch(choreo_run, "supervisor", signal.SIGTERM)

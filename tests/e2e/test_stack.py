"""`choreo up --detach` and `choreo down`: the services as background processes on the real broker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.settings import ChoreoSettings
from services.common.stack import available_services
from services.common.topics import ensure_topics
from tests.e2e.harness import TEST_TOKEN, timeline
from tests.support import choreo, eventually


@pytest.fixture
def stack_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CHOREO_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("CHOREO_ENVIRONMENT", "test")
    monkeypatch.setenv("CHOREO_APPROVAL_TOKEN", TEST_TOKEN)
    monkeypatch.setenv("CHOREO_HEALTH_PORT", "0")
    monkeypatch.setenv("CHOREO_APPROVAL_HTTP_PORT", "0")
    return tmp_path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
async def test_up_detached_runs_the_saga_and_down_stops_it(stack_env: Path, choreo_settings: ChoreoSettings) -> None:
    await ensure_topics(choreo_settings)
    up = choreo(choreo_settings, "up", "--detach", "--external-broker")
    pid_files = sorted((stack_env / "pids").glob("*.pid"))
    pids = [int(path.read_text()) for path in pid_files]
    try:
        assert up.returncode == 0, up.stderr
        assert sorted(path.stem for path in pid_files) == sorted(available_services())
        assert all((stack_env / "logs" / f"{path.stem}.log").exists() for path in pid_files)

        placed = choreo(
            choreo_settings, "publish", "order", "--order-id", "o-up", "--customer", "c-up",
            "--item", "WIDGET-1:1:5.00", "--country", "DE",
        )  # fmt: skip
        assert placed.returncode == 0, placed.stderr
        seen = await eventually(
            lambda: timeline(choreo_settings, "o-up"), lambda types: "OrderCompleted" in types, timeout=90
        )
        assert seen[-1] == "OrderCompleted"
    finally:
        down = choreo(choreo_settings, "down", "--keep-broker")
    assert down.returncode == 0, down.stderr
    assert pids
    assert not any(_alive(pid) for pid in pids)
    assert list((stack_env / "pids").glob("*.pid")) == []

"""The event loop setting picks the loop a service runs on."""

from __future__ import annotations

import asyncio

import pytest

from services.common.loop import EventLoopKind, run
from services.common.settings import ChoreoSettings


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(("kind", "module"), [("asyncio", "asyncio"), ("uvloop", "uvloop")])
def test_the_chosen_loop_runs_the_service(kind: EventLoopKind, module: str) -> None:
    assert run(loop_module(), kind).split(".")[0] == module


def test_the_event_loop_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOREO_EVENT_LOOP", "uvloop")
    assert ChoreoSettings().event_loop == "uvloop"
    monkeypatch.setenv("CHOREO_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="event_loop"):
        ChoreoSettings()

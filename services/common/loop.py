"""The event loop a service runs on: asyncio's own, or uvloop (libuv, its loop and sockets in C)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

EventLoopKind = Literal["asyncio", "uvloop"]
Result = TypeVar("Result")


def loop_factory(kind: EventLoopKind) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if kind == "asyncio":
        return None
    try:
        import uvloop  # an optional dependency, only where it is chosen
    except ImportError as error:
        raise RuntimeError("CHOREO_EVENT_LOOP=uvloop needs the uvloop package: pip install '.[uvloop]'") from error
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, Result], kind: EventLoopKind) -> Result:
    """`asyncio.run(main)` on the chosen kind of loop."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)

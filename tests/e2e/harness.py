"""The services of the saga running in the test process, each on its own transactional runner."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.trace import TracerProvider

from schemas.envelope import Envelope
from schemas.events import TERMINAL_EVENTS
from schemas.topics import AUDIT
from services.common.processor import TransactionalRunner
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from tests.support import eventually, read_topic

SAGA_SERVICES: tuple[str, ...] = ("audit", "shipping", "approval", "payment", "inventory")
TEST_TOKEN = "e2e-reviewer-token-3b7f"


def service_settings(name: str, base: ChoreoSettings, **overrides: Any) -> ChoreoSettings:
    module = importlib.import_module(f"services.{name}.settings")
    settings_class = getattr(module, f"{name.capitalize()}Settings")
    defaults: dict[str, Any] = {"approval_token": TEST_TOKEN} if name == "approval" else {}
    settings: ChoreoSettings = settings_class(
        bootstrap_servers=base.bootstrap_servers,
        topic_prefix=base.topic_prefix,
        partitions=base.partitions,
        environment="test",
        **{**defaults, **overrides},
    )
    return settings


class SagaStack:
    """Start and stop services at will; `settle()` waits until every running one has caught up."""

    def __init__(
        self,
        base: ChoreoSettings,
        overrides: dict[str, dict[str, Any]] | None = None,
        tracer_providers: Mapping[str, TracerProvider] | None = None,
    ) -> None:
        self.base = base
        self.overrides = overrides or {}
        self.tracer_providers = tracer_providers or {}
        self.runners: dict[str, TransactionalRunner] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def __aenter__(self) -> SagaStack:
        await ensure_topics(self.base)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(*list(self.runners))

    async def start(self, *names: str) -> None:
        for name in names or SAGA_SERVICES:
            settings = service_settings(name, self.base, **self.overrides.get(name, {}))
            app = importlib.import_module(f"services.{name}.app").build_app(settings)
            runner = TransactionalRunner(
                settings, app, tick_interval=0.2, tracer_provider=self.tracer_providers.get(name)
            )
            self.runners[name] = runner
            self._tasks[name] = asyncio.create_task(runner.run(), name=name)
        await asyncio.wait_for(
            asyncio.gather(*(self.runners[name].wait_assigned() for name in names or SAGA_SERVICES)), 60
        )

    async def stop(self, *names: str) -> None:
        for name in names:
            runner = self.runners.pop(name)
            runner.stop()
            task = self._tasks.pop(name)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)

    async def settle(self, timeout: float = 60.0) -> None:
        """Wait until every running service has processed everything committed on its inputs."""

        async def lags() -> list[int]:
            return [await runner.lag() for runner in self.runners.values()]

        await eventually(lags, lambda values: all(value == 0 for value in values), timeout=timeout)
        # A service that just caught up may have produced for another one: check once more.
        await eventually(lags, lambda values: all(value == 0 for value in values), timeout=timeout)


async def audit_by_order(settings: ChoreoSettings) -> dict[str, list[Envelope]]:
    timelines: dict[str, list[Envelope]] = defaultdict(list)
    for record in await read_topic(settings, AUDIT):
        envelope = Envelope.from_bytes(record.value)
        timelines[envelope.order_id].append(envelope)
    return timelines


async def timeline(settings: ChoreoSettings, order_id: str) -> list[str]:
    return [envelope.type for envelope in (await audit_by_order(settings)).get(order_id, [])]


async def wait_for_events(settings: ChoreoSettings, order_id: str, *types: str, timeout: float = 60.0) -> list[str]:
    """The order's audit timeline once it contains every one of `types`."""
    return await eventually(
        lambda: timeline(settings, order_id), lambda seen: all(t in seen for t in types), timeout=timeout
    )


def terminal_count(envelopes: Sequence[Envelope]) -> int:
    return sum(1 for envelope in envelopes if type(envelope.data) in TERMINAL_EVENTS)

"""In normal operation the stack logs no ERROR and repeats no WARNING: idle, under a small load, idle again.

Every service runs as its own process on the real broker, the monitor checking the others' /health.
faust arms its livelock checks (which logged an ERROR every ~7 s about the monitor's own changelog)
only once `stream_processing_timeout` has passed since start, 5 minutes by default; the monitor gets
5 s here so that its checks run several times within the test. The records are counted by their
`level` field, from every line every process wrote.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from tests.e2e.processes import ProcessStack
from tests.support import eventually
from tests.workload import SERVICES, missing_terminals, plan_orders, schedule, send_scheduled, workload_env

FAUST_ARMED_AFTER_S = 5
# faust looks at every partition every 2.5 commit intervals (7 s); the run covers several of those.
IDLE_S = 12.0
LOAD_ORDERS = 24
LOAD_S = 8.0
RUN_AT_LEAST_S = 36.0
MONITOR_INTERVAL_S = 2
MOST_REPEATS_OF_A_WARNING = 3


def level_counts(stack: ProcessStack) -> tuple[list[dict[str, object]], Counter[tuple[str, str]]]:
    """Every ERROR/CRITICAL record, and how often each (logger, message) was logged at WARNING."""
    errors: list[dict[str, object]] = []
    warnings: Counter[tuple[str, str]] = Counter()
    for file, record in stack.logged():
        level = record.get("level")
        if level in ("ERROR", "CRITICAL"):
            errors.append({"file": file, **record})
        elif level == "WARNING":
            warnings[(str(record.get("logger")), str(record.get("message")))] += 1
    return errors, warnings


def raw_lines(stack: ProcessStack) -> list[str]:
    """Lines that are no JSON record: output around the logging (a traceback printed raw, say)."""
    found = []
    for path in sorted(stack.log_dir.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                json.loads(line)
            except json.JSONDecodeError:
                found.append(f"{path.name}: {line}")
    return found


@pytest.mark.slow
async def test_idle_and_under_a_small_load_the_stack_logs_no_error_and_repeats_no_warning(
    choreo_settings: ChoreoSettings, tmp_path: Path
) -> None:
    await ensure_topics(choreo_settings)
    stack = ProcessStack(choreo_settings, tmp_path / "logs", workload_env(tmp_path))
    try:
        await stack.start(SERVICES)
        targets = {process.name: f"http://127.0.0.1:{process.health_port}/health" for process in stack.processes}
        stack.overrides = {
            **stack.overrides,
            "monitor": {
                "CHOREO_MONITOR_TARGETS": json.dumps(targets),
                "CHOREO_MONITOR_INTERVAL": str(MONITOR_INTERVAL_S),
                "STREAM_PROCESSING_TIMEOUT": str(FAUST_ARMED_AFTER_S),
            },
        }
        started = time.monotonic()
        await stack.start(["monitor"])
        [monitor] = stack.instances("monitor")

        # Idle, then a small load of every kind of order, then idle until the run is long enough.
        await asyncio.sleep(IDLE_S)
        orders = plan_orders(random.Random(7), LOAD_ORDERS, "quiet")
        await send_scheduled(choreo_settings, schedule(random.Random(7), orders, LOAD_S))
        await eventually(lambda: missing_terminals(choreo_settings, orders), lambda missing: not missing, timeout=30)

        async def monitor_state() -> tuple[float, int]:
            answer = await monitor.health()
            checks = int(answer[1].get("checks", 0)) if answer is not None else 0
            return time.monotonic() - started, checks

        # The monitor has checked every service several times, and faust's checks have run several times.
        await eventually(
            monitor_state,
            lambda state: state[0] >= RUN_AT_LEAST_S and state[1] >= 3 * len(targets),
            timeout=RUN_AT_LEAST_S + 15,
            interval=0.5,
        )
        stack.check_alive()
    finally:
        stack.close()

    errors, warnings = level_counts(stack)
    assert errors == [], "\n".join(json.dumps(error) for error in errors)
    repeated = {key: count for key, count in warnings.items() if count > MOST_REPEATS_OF_A_WARNING}
    assert repeated == {}, repeated
    assert raw_lines(stack) == []

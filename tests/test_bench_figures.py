"""The benchmark's CPU figures: the stack's total per saga leaves out the load generator."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

from benchmarks.saga_bench import LOAD_GENERATOR, PathFigures, Report, finite, render, stack_cpu_ms


def _report(per_saga: dict[str, float]) -> Report:
    choreo = PathFigures("choreo", cpu_ms_per_saga=per_saga, cpu_ms_per_saga_total=stack_cpu_ms(per_saga))
    return Report(
        mix={"completed": 100},
        partitions=6,
        bootstrap="127.0.0.1:1",
        local_broker=True,
        quick=True,
        machine={"cpus": 2},
        flat_definition="",
        choreo=choreo,
    )


def test_the_total_adds_the_services_and_the_broker_but_not_the_load_generator() -> None:
    per_saga = {"inventory": 1.25, "payment": 0.75, "broker (jvm)": 2.0, LOAD_GENERATOR: 9.0}

    assert math.isclose(stack_cpu_ms(per_saga), 4.0)


def test_the_json_and_the_table_carry_the_total() -> None:
    report = _report({"audit": 0.5, "broker (jvm)": 1.5, LOAD_GENERATOR: 3.0})

    assert json.loads(json.dumps(finite(asdict(report))))["choreo"]["cpu_ms_per_saga_total"] == 2.0
    assert any(line.split()[:3] == ["choreo", "total", "2.00"] for line in render(report).splitlines())

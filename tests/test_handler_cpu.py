"""`benchmarks.handler_cpu`: the five apps in one process, every order ending as its kind says, its CPU reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import saga_bench
from benchmarks.handler_cpu import SERVICES, TOTAL, main
from schemas.events import OrderCancelled


def test_every_order_of_the_bench_mix_ends_as_its_kind_says_and_each_service_s_cpu_is_reported(
    tmp_path: Path,
) -> None:
    figures_path = tmp_path / "figures.json"
    assert main(["--sagas", "40", "--runs", "1", "--json", str(figures_path)]) == 0
    figures = json.loads(figures_path.read_text())
    assert figures["unexpected"] == 0
    assert set(figures["us_per_saga"]) == {*SERVICES, TOTAL}
    assert all(figures["us_per_saga"][name] > 0 for name in SERVICES)
    assert figures["us_per_saga"][TOTAL] == pytest.approx(sum(figures["us_per_saga"][name] for name in SERVICES))
    records = figures["records_per_saga"]
    # One order placed a saga; the audit writes each saga event it reads, once.
    assert records["cpu.orders"] == 1
    events = sum(count for topic, count in records.items() if topic.endswith(".events") or topic == "cpu.orders")
    assert records["cpu.audit"] == events


def test_an_order_that_ends_otherwise_than_its_kind_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # Orders that complete, checked against an expectation that they are cancelled.
    monkeypatch.setitem(saga_bench.EXPECTED_TERMINAL, "completed", OrderCancelled.__name__)
    assert main(["--sagas", "5", "--runs", "1", "--mix", "completed=1"]) == 1

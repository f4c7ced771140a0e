"""The comparison of bench variants: parsing a variant, the medians table, and running another tree's code."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.compare import HERE, Variant, median, overlay, parse_variant, render


def test_a_variant_has_a_name_environment_and_an_optional_tree(tmp_path: Path) -> None:
    (tmp_path / "services").mkdir()
    assert parse_variant("base") == Variant("base")
    assert parse_variant("uv:CHOREO_EVENT_LOOP=uvloop,X=1") == Variant("uv", {"CHOREO_EVENT_LOOP": "uvloop", "X": "1"})
    assert parse_variant(f"old@{tmp_path}") == Variant("old", {}, tmp_path.resolve())
    for bad in (":X=1", "a:X", f"a@{tmp_path / 'missing'}"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)


def report(flat: float, total: float, p99: float, **per_process: float) -> dict[str, object]:
    return {
        "choreo": {
            "max_flat_per_s": flat,
            "cpu_ms_per_saga_total": total,
            "cpu_ms_per_saga": per_process,
            "latency": {"p50_ms": p99 / 2, "p99_ms": p99},
            "latency_rate_per_s": flat / 2,
        },
        "choreo_over_raw": None,
    }


def test_the_table_gives_each_variants_median_and_every_run() -> None:
    variants = [Variant("a"), Variant("b")]
    reports = {
        "a": [report(200, 9.0, 600, audit=1.0), report(100, 11.0, 700, audit=1.2), report(200, 10.0, 650, audit=1.1)],
        "b": [report(300, 6.0, 300, audit=0.5), report(300, 6.5, 320, audit=0.6), report(200, 7.0, 310, audit=0.7)],
    }
    table = render(variants, reports)
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "200 (200, 100, 200)" in lines["highest flat rate, sagas/s"]
    assert "300 (300, 300, 200)" in lines["highest flat rate, sagas/s"]
    assert "10.00 (9.00, 11.00, 10.00)" in lines["CPU per saga, whole stack, ms"]
    assert "0.60 (0.50, 0.60, 0.70)" in lines["CPU per saga: audit, ms"]
    assert "- (-, -, -)" in lines["choreo / raw, %"]
    assert median([None, 3.0, 1.0]) == 2.0
    assert median([None]) is None


def test_a_tree_variant_runs_that_trees_services_with_this_checkouts_benchmarks(tmp_path: Path) -> None:
    tree = tmp_path / "old"
    (tree / "services").mkdir(parents=True)
    (tree / "schemas").mkdir()
    (tree / "services" / "__init__.py").write_text("WHERE = 'old tree'\n")
    (tree / "schemas" / "__init__.py").write_text("")
    folder = overlay(Variant("old", {}, tree), tmp_path / "scratch")
    assert folder is not None
    env = {**os.environ, "PYTHONPATH": str(folder), "PYTHONSAFEPATH": "1"}
    probe = "import services, benchmarks; print(services.WHERE, benchmarks.__file__)"
    found = subprocess.run([sys.executable, "-c", probe], env=env, cwd=HERE, capture_output=True, text=True, check=True)
    assert found.stdout.startswith("old tree ")
    benchmarks_file = Path(found.stdout.rsplit(" ", 1)[1].strip())
    assert benchmarks_file.resolve().is_relative_to(HERE)

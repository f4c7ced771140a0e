"""Several `choreo bench` runs of two or more variants, in turns, and the median of each figure.

    python -m benchmarks.compare --variant asyncio:CHOREO_EVENT_LOOP=asyncio \\
        --variant uvloop:CHOREO_EVENT_LOOP=uvloop [--runs 3] [--out bench-results/compare] -- --quick --skip-raw

A variant is `NAME[:VAR=VALUE,...][@TREE]`: environment variables for the stack, and optionally another
checkout (a `git worktree` of an earlier commit) whose `services` and `schemas` the stack then runs, while
the benchmark code stays this checkout's, so every column is measured by the same code. Runs alternate
between the variants (A B A B ...), so the machine's noise falls on all of them alike. Everything after
`--` goes to `benchmarks.saga_bench` unchanged. It prints one table of medians (and every run's value)
and writes each run's JSON, table and plot, and a summary JSON, to `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.compare")

HERE = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Variant:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    tree: Path | None = None


def parse_variant(text: str) -> Variant:
    """`NAME[:VAR=VALUE,...][@TREE]`."""
    spec, _, tree = text.partition("@")
    name, _, assignments = spec.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"variant {text!r}: a name comes first")
    env = {}
    for assignment in filter(None, assignments.split(",")):
        key, equals, value = assignment.partition("=")
        if not equals or not key:
            raise argparse.ArgumentTypeError(f"variant {text!r}: {assignment!r} is not VAR=VALUE")
        env[key] = value
    root = Path(tree).resolve() if tree else None
    if root is not None and not (root / "services").is_dir():
        raise argparse.ArgumentTypeError(f"variant {text!r}: {root} has no services/ folder")
    return Variant(name, env, root)


# Each figure: its label, how to read it from a bench report, and its format.
Figure = tuple[str, Callable[[dict[str, Any]], float | None], str]


def _path(report: dict[str, Any], *keys: str) -> Any:
    found: Any = report
    for key in keys:
        if not isinstance(found, dict):
            return None
        found = found.get(key)
    return found


def figures(reports: Sequence[dict[str, Any]]) -> list[Figure]:
    """The figures the reports have: the stack's, then each process's CPU per saga."""
    rows: list[Figure] = [
        ("highest flat rate, sagas/s", lambda r: _path(r, "choreo", "max_flat_per_s"), ".0f"),
        ("CPU per saga, whole stack, ms", lambda r: _path(r, "choreo", "cpu_ms_per_saga_total"), ".2f"),
        ("latency at 50%: p50 ms", lambda r: _path(r, "choreo", "latency", "p50_ms"), ".0f"),
        ("latency at 50%: p99 ms", lambda r: _path(r, "choreo", "latency", "p99_ms"), ".0f"),
        ("rate of the latency run, sagas/s", lambda r: _path(r, "choreo", "latency_rate_per_s"), ".0f"),
        ("choreo / raw, %", lambda r: _percent(_path(r, "choreo_over_raw")), ".1f"),
    ]
    processes = dict.fromkeys(name for r in reports for name in (_path(r, "choreo", "cpu_ms_per_saga") or {}))
    for name in processes:
        rows.append((f"CPU per saga: {name}, ms", _reader("choreo", "cpu_ms_per_saga", name), ".2f"))
    return rows


def _reader(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda report: _path(report, *keys)


def _percent(value: Any) -> float | None:
    return value * 100 if isinstance(value, int | float) else None


def median(values: Sequence[float | None]) -> float | None:
    found = [value for value in values if value is not None]
    return statistics.median(found) if found else None


def render(variants: Sequence[Variant], reports: dict[str, list[dict[str, Any]]]) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = figures([report for runs in reports.values() for report in runs])
    width = max(len(label) for label, _, _ in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{variant.name:>28}" for variant in variants)]
    for label, read, spec in rows:
        cells = []
        for variant in variants:
            values = [read(report) for report in reports[variant.name]]
            every = ", ".join(fmt(value, spec) for value in values)
            cells.append(f"{fmt(median(values), spec)} ({every})")
        lines.append(f"{label:<{width}}" + "".join(f"{cell:>28}" for cell in cells))
    lines.append(f"(medians of {max(len(runs) for runs in reports.values())} runs; in brackets, every run in order)")
    return "\n".join(lines) + "\n"


def overlay(variant: Variant, root: Path) -> Path | None:
    """A folder whose `services` and `schemas` are the variant's tree and whose `benchmarks` are ours."""
    if variant.tree is None:
        return None
    folder = root / f"tree-{variant.name}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in (("services", variant.tree), ("schemas", variant.tree), ("benchmarks", HERE)):
        link = folder / name
        if not link.exists():
            link.symlink_to(target / name)
    return folder


def run_once(variant: Variant, bench_args: Sequence[str], json_path: Path, scratch: Path) -> dict[str, Any]:
    env = {**os.environ, **variant.env}
    tree = overlay(variant, scratch)
    if tree is not None:
        # The stack's processes inherit this: they import the variant's code, not the working directory's.
        env["PYTHONPATH"] = str(tree)
        env["PYTHONSAFEPATH"] = "1"
    command = [sys.executable, "-m", "benchmarks.saga_bench", *bench_args, "--json", str(json_path)]
    command += ["--png", str(json_path.with_suffix(".png"))]
    log.info("%s: %s", variant.name, " ".join(command))
    # Each run's own table goes beside its JSON; stdout is left for the comparison.
    with json_path.with_suffix(".txt").open("w") as table:
        subprocess.run(command, env=env, cwd=HERE, check=True, stdout=table)
    report: dict[str, Any] = json.loads(json_path.read_text())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--variant", type=parse_variant, action="append", required=True, help="NAME[:VAR=V,...][@TREE]")
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/compare"), help="folder of the JSON files")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: arguments of benchmarks.saga_bench")
    args = parser.parse_args(argv)
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    names = [variant.name for variant in args.variant]
    if len(set(names)) != len(names):
        parser.error("variant names must differ")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    reports: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="choreo-compare-") as scratch:
        for number in range(1, args.runs + 1):
            for variant in args.variant:
                path = args.out / f"{variant.name}-{number}.json"
                reports[variant.name].append(run_once(variant, bench_args, path, Path(scratch)))
    text = render(args.variant, reports)
    sys.stdout.write(text)
    summary = {
        "variants": [{"name": v.name, "env": v.env, "tree": str(v.tree) if v.tree else None} for v in args.variant],
        "bench_args": bench_args,
        "table": text,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

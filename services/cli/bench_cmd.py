"""`choreo bench`: sagas per second, latency and cost against the raw Kafka path (benchmarks.saga_bench)."""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from services.common.broker import REPO_ROOT
from services.common.settings import ChoreoSettings


def benchmark_module(name: str) -> ModuleType:
    """`benchmarks.<name>`, which offers `add_arguments`, `finish_arguments`, `configure_logging` and `run`."""
    # The benchmarks live beside the packages, not in them; the console script runs from anywhere.
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def add_benchmark_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    command: str,
    module: str,
    *,
    summary: str,
    description: str,
) -> None:
    """`choreo <command>`, with the options of `benchmarks.<module>`, which it runs."""
    parser = subparsers.add_parser(command, help=summary, description=description)
    benchmark_module(module).add_arguments(parser)

    def handler(args: argparse.Namespace, _settings: ChoreoSettings) -> int:
        benchmark = benchmark_module(module)
        benchmark.configure_logging()
        code: int = benchmark.run(benchmark.finish_arguments(args))
        return code

    parser.set_defaults(handler=handler)


def add_bench_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_benchmark_command(
        subparsers,
        "bench",
        "saga_bench",
        summary="sagas/s at the highest flat offered rate, latency at half of it, against raw aiokafka",
        description="Starts a throwaway broker and the services, sweeps the offered rate, measures latency at "
        "50%% of the highest rate whose saga lag stays flat, then the raw aiokafka path through the same broker; "
        "prints a table and writes JSON and a PNG plot. About 5 minutes on 2 cores; --quick about 2.",
    )

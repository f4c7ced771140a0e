"""`choreo bench`: sagas per second, latency and cost against the raw Kafka path (benchmarks.saga_bench)."""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from services.common.broker import REPO_ROOT
from services.common.settings import ChoreoSettings


def _bench_module() -> ModuleType:
    # The benchmarks live beside the packages, not in them; the console script runs from anywhere.
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    return importlib.import_module("benchmarks.saga_bench")


def add_bench_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="sagas/s at the highest flat offered rate, latency at half of it, against raw aiokafka",
        description="Starts a throwaway broker and the services, sweeps the offered rate, measures latency at "
        "50%% of the highest rate whose saga lag stays flat, then the raw aiokafka path through the same broker; "
        "prints a table and writes JSON and a PNG plot. About 5 minutes on 2 cores; --quick about 2.",
    )
    _bench_module().add_arguments(bench)
    bench.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace, _settings: ChoreoSettings) -> int:
    module = _bench_module()
    module.configure_logging()
    code: int = module.run(module.finish_arguments(args))
    return code

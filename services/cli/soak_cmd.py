"""`choreo soak`: the whole stack at a steady rate for a long time, its state against the orders in flight."""

from __future__ import annotations

import argparse

from services.cli.bench_cmd import add_benchmark_command


def add_soak_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_benchmark_command(
        subparsers,
        "soak",
        "soak",
        summary="the stack at a steady rate for a long time: RSS, live changelog keys, broker disk, restore time",
        description="Starts a throwaway broker and every service with a short order retention (--horizon), offers "
        "orders at a steady rate (default: half the flat rate of a quick sweep) for --duration (default 30 "
        "minutes) or --orders, restarts a service after --restart-at orders of history and times its restore; "
        "prints RSS per service, live keys per changelog against the orders in flight, broker disk per topic "
        "and the restore times, and writes JSON and a PNG plot of them over time.",
    )

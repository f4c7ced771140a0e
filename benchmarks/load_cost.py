"""What the benchmark's load generator costs alone: its own CPU a saga, and the broker's in serving it.

    .venv/bin/choreo broker start            # prints the broker's address and pid
    python -m benchmarks.load_cost --bootstrap HOST:PORT [--broker-pid PID] [--sagas 3000] [--rate 300] [--runs 3]

`choreo bench` runs its load generator on the two cores it measures the stack on, so what the generator
spends is taken from the stack. Here it runs without the stack: it offers `--sagas` orders at `--rate` a
second to one topic while its watcher follows another, which a separate process fills with ten records a
saga (nine others, then the saga's terminal event) at ten times the rate, as the audit topic fills in a
real run. It prints the generator's CPU a saga (every thread of the process, librdkafka's among them) and,
with `--broker-pid`, the broker's over the same time, which includes serving the filling process. Run it
in another checkout too (a `git worktree` of an earlier commit) to compare two generators.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Producer

from benchmarks import raw_pipeline, saga_bench
from schemas.envelope import Envelope, Source
from services.common.kafka import confluent_options, partition_for
from services.common.settings import ChoreoSettings

log = logging.getLogger("benchmarks.load_cost")

RECORDS_A_SAGA = 10
WAIT_FOR_END_S = 60.0
FEED_PACE_EVERY = 100


@dataclass(frozen=True)
class Cost:
    sagas: int
    ended: int
    generator_ms: float
    broker_ms: float | None


def audit_like(orders: Sequence[saga_bench.PlannedOrder]) -> list[tuple[bytes, bytes]]:
    """Ten keyed records a saga: its order nine times, then the same bytes typed as its terminal event."""
    records = []
    for order in orders:
        value = Envelope.new(order.event, order_id=order.order_id, source=Source.CLIENT).to_bytes()
        terminal = value.replace(b'"type":"OrderPlaced"', b'"type":"OrderCompleted"', 1)
        if terminal == value:
            raise RuntimeError("an envelope's bytes no longer spell its type as this benchmark expects")
        key = order.order_id.encode()
        records += [(key, value)] * (RECORDS_A_SAGA - 1) + [(key, terminal)]
    return records


def feed(bootstrap: str, topic: str, path: Path, rate: float, partitions: int) -> None:
    """Writes the records of `path` (a key, a tab and a value a line) to `topic` at `rate` a second."""
    # The same connection options as the generator's clients (TLS, SASL), from the environment's settings.
    producer = Producer({**confluent_options(ChoreoSettings(bootstrap_servers=bootstrap)), "linger.ms": 2})
    started = time.monotonic()
    for number, line in enumerate(path.read_bytes().split(b"\n")):
        key, _, value = line.partition(b"\t")
        producer.produce(topic, value, key, partition=partition_for(key, partitions))
        if number % FEED_PACE_EVERY == 0:
            producer.poll(0)
            time.sleep(max(0.0, started + number / rate - time.monotonic()))
    if producer.flush(WAIT_FOR_END_S):
        raise RuntimeError("the feeder's records were not all acknowledged")


def cpu_s(pid: int) -> float:
    usage = saga_bench.proc_usage(pid)
    if usage is None:
        raise RuntimeError(f"no process {pid}")
    return usage.cpu_s


async def measure(settings: ChoreoSettings, sagas: int, rate: float, broker_pid: int | None) -> Cost:
    await raw_pipeline.create_topics(settings)
    offered, watched = (raw_pipeline.hop_topic(settings.topic_prefix, hop) for hop in (0, 1))
    mix = {**dict.fromkeys(saga_bench.OUTCOMES, 0), "completed": 1}
    orders = saga_bench.plan_orders("c", sagas, mix, random.Random(sagas))
    with tempfile.NamedTemporaryFile(suffix=".records") as records:
        records.write(b"\n".join(key + b"\t" + value for key, value in audit_like(orders)))
        records.flush()
        offer = saga_bench.Offer(settings, offered, raw=False)
        watcher = saga_bench.Watcher(settings, watched, raw=False)
        await watcher.start()
        await offer.start()
        try:
            own, broker = cpu_s(os.getpid()), cpu_s(broker_pid) if broker_pid else None
            feeding = (watched, records.name, str(rate * RECORDS_A_SAGA), str(settings.partitions))
            feeder = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks.load_cost",
                "--bootstrap",
                settings.bootstrap_servers,
                "--feed",
                *feeding,
            )
            await offer.publish(orders, rate, {}, [])
            await watcher.wait_for([order.order_id for order in orders], WAIT_FOR_END_S, lambda: None)
            own = cpu_s(os.getpid()) - own
            broker = cpu_s(broker_pid) - broker if broker_pid and broker is not None else None
            if await asyncio.wait_for(feeder.wait(), WAIT_FOR_END_S):
                raise RuntimeError(f"the feeder failed (exit code {feeder.returncode})")
        finally:
            await offer.stop()
            await watcher.stop()
    ended = sum(1 for order in orders if order.order_id in watcher.ended)
    return Cost(sagas, ended, own * 1000 / sagas, None if broker is None else broker * 1000 / sagas)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--broker-pid", type=int)
    parser.add_argument("--sagas", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--feed", nargs=4, metavar=("TOPIC", "FILE", "RATE", "PARTITIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.feed:
        topic, path, rate, partitions = args.feed
        feed(args.bootstrap, topic, Path(path), float(rate), int(partitions))
        return 0
    costs = []
    for run in range(args.runs):
        prefix = f"load-{uuid.uuid4().hex[:8]}."
        settings = ChoreoSettings(bootstrap_servers=args.bootstrap, topic_prefix=prefix, environment="dev")
        cost = asyncio.run(measure(settings, args.sagas, args.rate, args.broker_pid))
        costs.append(cost)
        broker = "" if cost.broker_ms is None else f", broker {cost.broker_ms:.3f} ms"
        log.info("run %d: %d of %d sagas seen ended; generator %.3f ms%s a saga", run + 1, cost.ended,
                 cost.sagas, cost.generator_ms, broker)  # fmt: skip
    brokers = [cost.broker_ms for cost in costs if cost.broker_ms is not None]
    log.info(
        "median of %d: generator %.3f ms a saga%s", len(costs), statistics.median(c.generator_ms for c in costs),
        f", broker {statistics.median(brokers):.3f} ms" if brokers else "",
    )  # fmt: skip
    return 0 if all(cost.ended == cost.sagas for cost in costs) else 1


if __name__ == "__main__":
    sys.exit(main())

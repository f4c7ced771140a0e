"""One transactional hop on two client libraries: CPU per record and per transaction, and latency.

    python -m benchmarks.txn_spike [--rates 300,1500] [--seconds 20] [--repeats 3] [--warmup-s 15]

Each trial runs one *copier* process: it reads a topic read_committed and, in one transaction per
batch, writes every record to a second topic and commits its input offsets, as every hop of a saga
does. The copier is either aiokafka (the protocol in Python, as the runner uses it today) or
confluent-kafka (librdkafka, the protocol in C, KIP-447 fencing through the group metadata). A
feeder offers records at a fixed rate; a reader sees each one committed on the output topic. Per
trial it reports the copier's and the broker's CPU per record, the transactions per second, and the
latency from send to visible on the output. The two libraries alternate, trial by trial, on one broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import statistics
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks.saga_bench import percentile, proc_usage, start_broker

log = logging.getLogger("benchmarks.txn_spike")

LIBRARIES = ("aiokafka", "confluent-kafka")
PARTITIONS = 6
MAX_BATCH = 2000
FETCH_WAIT_MS = 100
STAMP = struct.Struct(">d")
PAYLOAD = b"x" * 400  # about the size of an OrderPlaced envelope


@dataclass
class Trial:
    library: str
    rate_per_s: float
    records: int
    transactions: int
    copier_cpu_ms_per_record: float
    broker_cpu_ms_per_record: float
    copier_cpu_ms_per_transaction: float
    records_per_transaction: float
    latency_p50_ms: float
    latency_p99_ms: float


# --- the copier (its own process, so its CPU is its own) -------------------------------------------


@dataclass
class Progress:
    """What the copier did; SIGUSR1 marks the start of the measured window, SIGTERM stops it."""

    transactions: int = 0
    before_window: int = 0
    stopping: bool = False

    def mark(self, *_: object) -> None:
        self.before_window = self.transactions

    def stop(self, *_: object) -> None:
        self.stopping = True


async def copy_with_aiokafka(bootstrap: str, source: str, target: str, group: str, progress: Progress) -> None:
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=group,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=FETCH_WAIT_MS,
        max_poll_records=MAX_BATCH,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"{group}-tx", acks="all")
    await consumer.start()
    await producer.start()
    try:
        while not progress.stopping:
            batch = await consumer.getmany(timeout_ms=FETCH_WAIT_MS)
            batch = {tp: rows for tp, rows in batch.items() if rows}
            if not batch:
                continue
            async with producer.transaction():
                sends = [
                    await producer.send(target, row.value, key=row.key, partition=tp.partition)
                    for tp, rows in batch.items()
                    for row in rows
                ]
                offsets = {tp: rows[-1].offset + 1 for tp, rows in batch.items()}
                await producer.send_offsets_to_transaction(offsets, group)
                await asyncio.gather(*sends)
            progress.transactions += 1
    finally:
        await producer.stop()
        await consumer.stop()


def copy_with_confluent(bootstrap: str, source: str, target: str, group: str, progress: Progress) -> None:
    from confluent_kafka import Consumer, Producer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": FETCH_WAIT_MS,
        }
    )
    # linger.ms 0 as aiokafka's default; a lower retry backoff keeps send_offsets_to_transaction fast.
    producer = Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": f"{group}-tx", "linger.ms": 0, "retry.backoff.ms": 20}
    )
    producer.init_transactions()
    consumer.subscribe([source])
    try:
        while not progress.stopping:
            # Whatever is there as soon as something is, as aiokafka's getmany does: consume() alone
            # would wait for a full batch or its whole timeout.
            first = consumer.poll(FETCH_WAIT_MS / 1000)
            if first is None:
                continue
            messages = [m for m in [first, *consumer.consume(MAX_BATCH - 1, 0)] if not m.error()]
            if not messages:
                continue
            producer.begin_transaction()
            for message in messages:
                producer.produce(target, message.value(), message.key(), partition=message.partition() or 0)
            positions = consumer.position(consumer.assignment())
            producer.send_offsets_to_transaction(positions, consumer.consumer_group_metadata())
            producer.commit_transaction()
            progress.transactions += 1
    finally:
        consumer.close()


def copier_main(library: str, bootstrap: str, source: str, target: str, group: str) -> None:
    progress = Progress()
    signal.signal(signal.SIGUSR1, progress.mark)
    signal.signal(signal.SIGTERM, progress.stop)
    if library == "aiokafka":
        asyncio.run(copy_with_aiokafka(bootstrap, source, target, group, progress))
    else:
        copy_with_confluent(bootstrap, source, target, group, progress)
    sys.stdout.write(json.dumps({"transactions": progress.transactions - progress.before_window}) + "\n")


# --- the driver -----------------------------------------------------------------------------------------


async def create_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in names])
    finally:
        await admin.close()


async def feed(bootstrap: str, topic: str, rate: float, seconds: float) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    sent = 0
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate) + 1
            while sent < due:
                await producer.send(topic, STAMP.pack(time.time()) + PAYLOAD, key=str(sent).encode())
                sent += 1
            await asyncio.sleep(0.005)
        await producer.flush()
    finally:
        await producer.stop()
    return sent


class Reader:
    """Every record committed on `topic`, as (sent at, latency ms), read from the start while it runs."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.seen: list[tuple[float, float]] = []
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, isolation_level="read_committed", auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
        )  # fmt: skip
        self._topic = topic
        self._task: asyncio.Task[None] | None = None
        self._grew = asyncio.Event()

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign([TopicPartition(self._topic, p) for p in range(PARTITIONS)])
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            now = time.time()
            for rows in batch.values():
                for row in rows:
                    sent_at = STAMP.unpack_from(row.value)[0]
                    self.seen.append((sent_at, (now - sent_at) * 1000))
            if batch:
                self._grew.set()

    def since(self, moment: float) -> list[float]:
        return [latency for sent_at, latency in self.seen if sent_at >= moment]

    async def wait_for(self, count: int, moment: float, timeout_s: float) -> list[float]:
        deadline = time.monotonic() + timeout_s
        while len(found := self.since(moment)) < count and (left := deadline - time.monotonic()) > 0:
            self._grew.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._grew.wait(), left)
        return sorted(found)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


async def trial(bootstrap: str, broker_pid: int, library: str, rate: float, seconds: float) -> Trial:
    tag = uuid.uuid4().hex[:6]
    source, target, group = f"spike-in-{tag}", f"spike-out-{tag}", f"spike-{tag}"
    await create_topics(bootstrap, [source, target])
    copier = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.txn_spike", "--copier", library, bootstrap, source, target, group,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    reader = Reader(bootstrap, target)
    await reader.start()
    try:
        # The copier joins its group and starts its producer before the measured load begins.
        began = time.time()
        warm = await feed(bootstrap, source, 50, 3.0)
        if len(await reader.wait_for(warm, began, 90)) < warm:
            raise RuntimeError(f"{library} copier did not pass the warm-up")
        copier.send_signal(signal.SIGUSR1)
        window = time.time()
        before = _cpu(copier.pid), _cpu(broker_pid)
        sent = await feed(bootstrap, source, rate, seconds)
        latencies = await reader.wait_for(sent, window, 60)
        after = _cpu(copier.pid), _cpu(broker_pid)
    finally:
        await reader.stop()
        copier.send_signal(signal.SIGTERM)
        out, _ = await copier.communicate()
    # The few transactions between the end of the window and the stop carry no records: none are left.
    transactions = int(json.loads(out.decode().strip().splitlines()[-1])["transactions"])
    copier_ms, broker_ms = (after[0] - before[0]) * 1000, (after[1] - before[1]) * 1000
    return Trial(
        library=library,
        rate_per_s=rate,
        records=sent,
        transactions=transactions,
        copier_cpu_ms_per_record=copier_ms / sent,
        broker_cpu_ms_per_record=broker_ms / sent,
        copier_cpu_ms_per_transaction=copier_ms / max(1, transactions),
        records_per_transaction=sent / max(1, transactions),
        latency_p50_ms=percentile(latencies, 0.5),
        latency_p99_ms=percentile(latencies, 0.99),
    )


def _cpu(pid: int) -> float:
    usage = proc_usage(pid)
    return usage.cpu_s if usage is not None else float("nan")


def render(trials: list[Trial]) -> str:
    lines = [
        "transactional hop: one copier, read_committed in, one transaction per batch out (medians of the trials)",
        f"  {'library':<17}{'rate/s':>8}{'copier ms/rec':>15}{'broker ms/rec':>15}{'copier ms/txn':>15}"
        f"{'rec/txn':>9}{'p50 ms':>8}{'p99 ms':>8}{'trials':>8}",
    ]
    for rate in sorted({t.rate_per_s for t in trials}):
        for library in LIBRARIES:
            group = [t for t in trials if t.library == library and t.rate_per_s == rate]
            if not group:
                continue

            def median(name: str, of: list[Trial] = group) -> float:
                return float(statistics.median(getattr(t, name) for t in of))

            lines.append(
                f"  {library:<17}{rate:>8.0f}{median('copier_cpu_ms_per_record'):>15.3f}"
                f"{median('broker_cpu_ms_per_record'):>15.3f}{median('copier_cpu_ms_per_transaction'):>15.2f}"
                f"{median('records_per_transaction'):>9.1f}{median('latency_p50_ms'):>8.0f}"
                f"{median('latency_p99_ms'):>8.0f}{len(group):>8}"
            )
    return "\n".join(lines) + "\n"


async def drive(args: argparse.Namespace) -> list[Trial]:
    with tempfile.TemporaryDirectory(prefix="txn-spike-") as run_dir:
        broker, broker_pid = start_broker(Path(run_dir) / "broker")
        try:
            # A fresh JVM spends several times more CPU per transaction until its JIT has compiled the
            # hot paths: one discarded trial of each library first.
            for library in LIBRARIES:
                await trial(broker.bootstrap, broker_pid, library, args.rates[0], args.warmup_s)
            trials = []
            for repeat in range(args.repeats):
                for rate in args.rates:
                    for library in LIBRARIES if repeat % 2 == 0 else reversed(LIBRARIES):
                        result = await trial(broker.bootstrap, broker_pid, library, rate, args.seconds)
                        log.info("%s", result)
                        trials.append(result)
            return trials
        finally:
            broker.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--copier"]:
        library, bootstrap, source, target, group = argv[1:6]
        copier_main(library, bootstrap, source, target, group)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.txn_spike", description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=lambda text: [float(x) for x in text.split(",")], default=[300.0, 1500.0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-s", type=float, default=15.0, help="a discarded trial of each library first")
    parser.add_argument("--json", type=Path, default=Path("bench-results/txn-spike.json"))
    args = parser.parse_args(argv)
    trials = asyncio.run(drive(args))
    sys.stdout.write(render(trials))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"trials": [asdict(t) for t in trials]}
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

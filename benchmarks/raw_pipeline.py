"""The raw Kafka path the saga benchmark compares against: the same hops, no logic, no state.

A saga that completes crosses ten topics before an observer sees its terminal event (orders,
stock requests, stock replies, inventory events, ledger requests, ledger replies, payment events,
approval events, shipping events, audit). The raw pipeline has ten topics `raw.h0` .. `raw.h9` and
nine forwarding stages, grouped into five processes as the services are. A stage consumes its
topic in a consumer group and produces every record's key and value unchanged to the next topic
(acks=all, idempotent, offsets auto-committed: at-least-once, no transactions, no state).

    python -m benchmarks.raw_pipeline BOOTSTRAP PREFIX STAGE [STAGE ...]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from services.common.kafka import admin_client
from services.common.kafka import consumer as make_consumer
from services.common.kafka import producer as make_producer
from services.common.settings import ChoreoSettings

HOPS = 10
# Stages per process, mirroring inventory (3 inputs), payment (3), approval, shipping and audit.
PROCESSES: tuple[tuple[int, ...], ...] = ((0, 1, 2), (3, 4, 5), (6,), (7,), (8,))
PROCESS_NAMES: tuple[str, ...] = ("raw-inventory", "raw-payment", "raw-approval", "raw-shipping", "raw-audit")

log = logging.getLogger("benchmarks.raw_pipeline")


def hop_topic(prefix: str, hop: int) -> str:
    return f"{prefix}raw.h{hop}"


async def create_topics(settings: ChoreoSettings) -> None:
    admin = admin_client(settings)
    await admin.start()
    try:
        topics = [NewTopic(hop_topic(settings.topic_prefix, hop), settings.partitions, 1) for hop in range(HOPS)]
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(topics)
    finally:
        await admin.close()


async def forward(settings: ChoreoSettings, stage: int, stop: asyncio.Event) -> None:
    """Stage `stage`: raw.h<stage> -> raw.h<stage + 1>, record by record, batch by batch."""
    source, target = hop_topic(settings.topic_prefix, stage), hop_topic(settings.topic_prefix, stage + 1)
    consumer = make_consumer(
        settings,
        source,
        group_id=f"{settings.topic_prefix}raw-stage-{stage}",
        isolation_level="read_uncommitted",
        enable_auto_commit=True,
        max_poll_records=2000,
        fetch_max_wait_ms=100,
    )
    producer = make_producer(settings, linger_ms=2, max_batch_size=512 * 1024)
    await asyncio.gather(consumer.start(), producer.start())
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    await producer.send(target, record.value, key=record.key)
    finally:
        await producer.stop()
        await consumer.stop()


async def run(bootstrap: str, prefix: str, stages: Sequence[int]) -> None:
    settings = ChoreoSettings(bootstrap_servers=bootstrap, topic_prefix=prefix, environment="test")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await asyncio.gather(*(forward(settings, stage, stop) for stage in stages))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3:
        sys.stderr.write(__doc__ or "")
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(run(args[0], args[1], [int(stage) for stage in args[2:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a saga's time goes, hop by hop: every saga event of a `choreo bench` latency run, read back.

    .venv/bin/choreo broker start            # a broker that outlives the benchmark
    .venv/bin/choreo bench --quick --skip-raw --bootstrap HOST:PORT
    python -m benchmarks.hops --bootstrap HOST:PORT --topic-prefix PREFIX [--orders ID_PREFIX]

`PREFIX` is the benchmark's topic prefix (its log says `created topic <PREFIX>orders`). A record's Kafka
timestamp is when its producer sent it, in a transaction that commits after; its `ce_time` header is
when its handler made the event. For each hop from one event of an order to the next, in order of
timestamps, it prints the median and p99 of sent → sent, sent → handled (the input's commit, the fetch,
the wait for the next commit, the queue) and handled → sent (what is left before the output's commit).
Without `--orders`, the orders read are those of the last latency run (ids starting with `l`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from confluent_kafka import Message, TopicPartition

from benchmarks.saga_bench import LATENCY_LABEL, epoch_s, percentile
from schemas.envelope import CE_TIME, CE_TYPE
from schemas.topics import SAGA_TOPICS
from services.common.kafka import confluent_consumer
from services.common.settings import ChoreoSettings

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 1.5


@dataclass(frozen=True)
class Sent:
    """One saga event as read back."""

    event_type: str
    sent_ms: int
    handled_ms: float | None


def read_events(settings: ChoreoSettings) -> dict[str, list[Sent]]:
    """Every committed event on the saga topics, by order id."""
    consumer = confluent_consumer(settings, "choreo-hops")
    by_order: dict[str, list[Sent]] = defaultdict(list)
    try:
        names = [settings.topic(topic) for topic in SAGA_TOPICS]
        listed = consumer.list_topics(timeout=10).topics
        partitions = [(name, listed[name].partitions) for name in names if name in listed]
        consumer.assign([TopicPartition(name, number, 0) for name, numbers in partitions for number in numbers])
        while batch := consumer.consume(5000, POLL_TIMEOUT_S):
            for record in batch:
                key = record.key()
                if record.error() is None and isinstance(key, bytes):
                    by_order[key.decode()].append(_sent(record))
    finally:
        consumer.close()
    return by_order


def _sent(record: Message) -> Sent:
    headers: dict[str, bytes] = {}
    for header in record.headers() or []:
        name, value = header[0], header[1]
        if isinstance(name, str) and isinstance(value, bytes):
            headers[name] = value
    made = headers.get(CE_TIME)
    handled_ms = epoch_s(made.decode()) * 1000 if made else None
    named = headers.get(CE_TYPE)
    # A client may publish without the CloudEvents headers: its event's type is then read from the body.
    event_type = named.decode() if named is not None else str(json.loads(record.value() or b"{}").get("type", "?"))
    return Sent(event_type, record.timestamp()[1], handled_ms)


@dataclass
class Hop:
    sent_to_sent: list[float]
    sent_to_handled: list[float]
    handled_to_sent: list[float]


def hops(by_order: dict[str, list[Sent]], order_prefix: str) -> dict[str, Hop]:
    """Each hop's durations (ms) over the orders whose id starts with `order_prefix`."""
    found: dict[str, Hop] = defaultdict(lambda: Hop([], [], []))
    for order_id, events in by_order.items():
        if not order_id.startswith(order_prefix):
            continue
        chain = sorted(events, key=lambda event: event.sent_ms)
        for before, after in pairwise(chain):
            hop = found[f"{before.event_type} -> {after.event_type}"]
            hop.sent_to_sent.append(after.sent_ms - before.sent_ms)
            if after.handled_ms is not None:
                hop.sent_to_handled.append(after.handled_ms - before.sent_ms)
                hop.handled_to_sent.append(after.sent_ms - after.handled_ms)
    return found


def render(found: dict[str, Hop], least: int) -> str:
    def p50_p99(values: list[float]) -> str:
        ordered = sorted(values)
        return f"{percentile(ordered, 0.5):6.0f} {percentile(ordered, 0.99):6.0f}"

    lines = [f"{'hop':52s} {'n':>6s} | sent -> sent | sent -> handled | handled -> sent (p50, p99 ms)"]
    for name, hop in sorted(found.items(), key=lambda item: -len(item[1].sent_to_sent)):
        if len(hop.sent_to_sent) >= least:
            lines.append(
                f"{name:52s} {len(hop.sent_to_sent):6d} | {p50_p99(hop.sent_to_sent)} | "
                f"{p50_p99(hop.sent_to_handled)}   | {p50_p99(hop.handled_to_sent)}"
            )
    return "\n".join(lines)


def last_latency_run(by_order: dict[str, list[Sent]]) -> str:
    """The id prefix (`l<step>-<run>-`) of the latency run whose order was placed last."""
    runs = {order_id.rsplit("-", 1)[0] + "-": min(e.sent_ms for e in events) for order_id, events in by_order.items()}
    latency_runs = {run: placed for run, placed in runs.items() if run.startswith(LATENCY_LABEL)}
    if not latency_runs:
        raise SystemExit("no latency run found: pass --orders")
    return max(latency_runs, key=latency_runs.__getitem__)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", required=True, metavar="HOST:PORT")
    parser.add_argument("--topic-prefix", required=True)
    parser.add_argument("--orders", help="the id prefix of the orders to read (default: the last latency run)")
    parser.add_argument("--least", type=int, default=20, help="hops seen fewer times are left out")
    args = parser.parse_args(argv)
    settings = ChoreoSettings(bootstrap_servers=args.bootstrap, topic_prefix=args.topic_prefix)
    by_order = read_events(settings)
    order_prefix = args.orders or last_latency_run(by_order)
    chosen = sum(1 for order_id in by_order if order_id.startswith(order_prefix))
    log.info("read %d orders' events; %d orders start with %s", len(by_order), chosen, order_prefix)
    sys.stdout.write(render(hops(by_order, order_prefix), args.least) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

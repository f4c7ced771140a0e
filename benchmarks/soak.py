"""`choreo soak`: the whole stack at a steady rate for a long time; does its state follow the orders in flight?

    python -m benchmarks.soak [--rate SAGAS_PER_S] [--duration SECONDS | --orders N] [--horizon SECONDS]
        [--restart-at 10000,100000] [--restart-service inventory] [--json PATH] [--png PATH]
        [--bootstrap HOST:PORT [--broker-data-dir PATH]]

Starts a throwaway local broker (unless --bootstrap names one), provisions the topics under a
unique prefix and runs every service of the stack (inventory, payment, approval, shipping, audit
and the monitor) as processes, with a short order retention (the horizon, CHOREO_ORDER_RETENTION)
and a state folder of its own for each (CHOREO_STATE_DIR). Without --rate, a quick sweep of
benchmarks.saga_bench finds the highest flat rate first, and the soak offers half of it.

During the steady phase it samples, over time:

- the RSS of every service (and of the broker and the benchmark itself), from /proc;
- the live keys of every state changelog (`<service>.state`, `monitor.state`), read incrementally
  with a read_committed consumer, against the orders in flight (placed, terminal event not yet on
  audit) and the orders that ended within the last horizon (whose markers the services may keep);
- the disk every topic takes in the broker's log folders;

and after 10,000 and again after 100,000 orders of history (--restart-at; every order placed on
the stack counts, the sweep's too) it stops one service with SIGTERM, starts it again and times
how long it takes until its GET /health answers 200, beside what the service reports about its
restore (`restored_records`, `restore_seconds`, when its /health has them).

It prints a table and writes JSON and a PNG plot of all four over time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import logging
import math
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from benchmarks import saga_bench
from benchmarks.broker_figures import LiveKeys, topic_disk_usage
from schemas.events import OrderCompleted, OrderPlaced
from schemas.topics import (
    APPROVAL_STATE,
    AUDIT,
    AUDIT_STATE,
    INVENTORY_STATE,
    MONITOR_STATE,
    PAYMENT_STATE,
    SHIPPING_STATE,
    Topic,
    topic_of,
)
from services.common.settings import ChoreoSettings
from services.common.stack import SERVICES
from services.common.topics import ensure_topics

log = logging.getLogger("benchmarks.soak")

CHANGELOGS: tuple[Topic, ...] = (
    INVENTORY_STATE,
    PAYMENT_STATE,
    APPROVAL_STATE,
    SHIPPING_STATE,
    AUDIT_STATE,
    MONITOR_STATE,
)
DEFAULT_DURATION_S = 30 * 60.0
DEFAULT_RESTART_AT = "10000,100000"
# Orders are planned and published this many seconds' worth at a time, so a long run never holds
# all of its orders in memory at once.
CHUNK_S = 5.0
HEALTH_POLL_S = 0.05
HEALTH_TIMEOUT_S = 2.0
# The monitor checks every service this often, so its own state sees some work during the run.
MONITOR_INTERVAL_S = 10.0
# The share of the steady samples (after the warm-up) whose median is the start, and the end, figure.
EDGE_SHARE = 0.10
# A RocksDB cache this full of its limit counts as filled: the default warm-up lasts until every one is.
CACHE_FULL_SHARE = 0.9
BROKER = "broker (jvm)"


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Member:
    """One service of the stack: how to start it again, and where it answers."""

    name: str
    env: dict[str, str]
    health_url: str
    process: saga_bench.ServiceProcess
    restarts: int = 0


class Stack:
    def __init__(self, members: Sequence[Member], logs_dir: Path) -> None:
        self.members = {member.name: member for member in members}
        self.logs_dir = logs_dir
        self.restarting: set[str] = set()

    @classmethod
    def start(cls, settings: ChoreoSettings, run_dir: Path, horizon_s: float, state_store: str | None) -> Stack:
        base = saga_bench.service_env(settings, saga_bench.write_catalog(run_dir))
        base["CHOREO_ORDER_RETENTION"] = f"{horizon_s:g}"
        base["CHOREO_MONITOR_INTERVAL"] = f"{MONITOR_INTERVAL_S:g}"
        if state_store is not None:
            base["CHOREO_STATE_STORE"] = state_store
        ports = {name: saga_bench.free_port() for name in SERVICES}
        urls = {name: f"http://127.0.0.1:{port}/health" for name, port in ports.items()}
        base["CHOREO_MONITOR_TARGETS"] = json.dumps({name: url for name, url in urls.items() if name != "monitor"})
        logs_dir = run_dir / "logs"
        members = []
        for name in SERVICES:
            env = {**base, "CHOREO_STATE_DIR": str(run_dir / "state" / name), "CHOREO_HEALTH_PORT": str(ports[name])}
            if name == "approval":
                # Its documented /health is the reviewer API's, which also waits for the read model.
                env |= {"CHOREO_APPROVAL_HTTP_PORT": str(ports[name]), "CHOREO_HEALTH_PORT": "0"}
            members.append(Member(name, env, urls[name], spawn(name, env, logs_dir)))
        return cls(members, logs_dir)

    async def stop(self) -> None:
        await asyncio.to_thread(saga_bench.stop_services, self.processes())

    def processes(self) -> list[saga_bench.ServiceProcess]:
        return [member.process for member in self.members.values()]

    def pids(self) -> dict[str, int]:
        return {name: member.process.process.pid for name, member in self.members.items()}

    def check(self) -> None:
        for name, member in self.members.items():
            if name not in self.restarting:
                member.process.check()

    async def wait_healthy(self, client: httpx.AsyncClient, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        for member in self.members.values():
            if await healthy(client, member, deadline, self.check) is None:
                raise RuntimeError(f"{member.name} did not answer /health with 200 within {within_s:.0f} s")

    async def restart(self, name: str, client: httpx.AsyncClient, within_s: float) -> tuple[float, float | None, Any]:
        """SIGTERM, wait for the exit, start again: (stop seconds, start-to-healthy seconds, /health body)."""
        member = self.members[name]
        self.restarting.add(name)
        try:
            stopping = time.monotonic()
            await asyncio.to_thread(saga_bench.stop_services, [member.process])
            stop_s = time.monotonic() - stopping
            started = time.monotonic()
            member.process = spawn(name, member.env, self.logs_dir)
            member.restarts += 1
            body = await healthy(client, member, started + within_s, member.process.check)
            return stop_s, (time.monotonic() - started if body is not None else None), body
        finally:
            self.restarting.discard(name)


def spawn(name: str, env: dict[str, str], logs_dir: Path) -> saga_bench.ServiceProcess:
    return saga_bench.spawn(name, [sys.executable, "-m", f"services.{name}"], env, logs_dir)


async def healthy(client: httpx.AsyncClient, member: Member, deadline: float, check: Callable[[], None]) -> Any:
    """The body of the first 200 from `member`'s /health before `deadline` (monotonic), or None."""
    while time.monotonic() < deadline:
        check()
        with contextlib.suppress(httpx.HTTPError, ValueError):
            answer = await client.get(member.health_url)
            if answer.status_code == 200:
                return answer.json()
        await asyncio.sleep(HEALTH_POLL_S)
    return None


def find_number(document: Any, key: str) -> float | None:
    """`key`'s value anywhere in a JSON document (approval nests its runner's report), if it is a number."""
    if isinstance(document, dict):
        value = document.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        children = list(document.values())
    elif isinstance(document, list):
        children = document
    else:
        return None
    for child in children:
        found = find_number(child, key)
        if found is not None:
            return found
    return None


# --- figures -----------------------------------------------------------------------------------


@dataclass
class Sample:
    at_s: float  # since the steady phase began
    placed: int  # orders placed in the steady phase so far
    ended: int  # of those, ended on audit
    in_flight: int
    ended_in_horizon: int  # orders of the whole stack that ended within the last horizon
    rss_mb: dict[str, float]
    disk_bytes: dict[str, int]  # per topic, named without the prefix: what its files take on disk
    segment_bytes: dict[str, int]  # the sizes of its log segments
    rocks_mb: dict[str, float] = field(default_factory=dict)  # what each service's RocksDB cache holds
    rocks_limit_mb: dict[str, float] = field(default_factory=dict)  # and its limit


@dataclass
class KeysSample:
    at_s: float
    in_flight: int
    ended_in_horizon: int
    live: dict[str, int]  # per changelog, named without the prefix
    read_s: float
    complete: bool  # False: the read ran out of its budget before the end offsets


@dataclass
class RestartFigures:
    service: str
    threshold: int
    history: int  # orders placed on the stack when the service was stopped
    at_s: float
    stop_s: float  # SIGTERM to exit
    healthy_s: float | None  # start to the first 200 from /health; None: not within the timeout
    restored_records: float | None  # from the service's /health, when it reports them
    restore_seconds: float | None
    changelog_live_keys: int | None  # of its changelog, counted just before the stop
    health: Any = None


@dataclass
class RssFigures:
    name: str
    start_mb: float
    end_mb: float
    change_pct: float
    min_mb: float
    max_mb: float
    restarts: int
    span: str  # which of a restarted service's processes the figures are of
    rocks_start_mb: float | None = None  # its RocksDB cache, at the start and the end
    rocks_end_mb: float | None = None
    rocks_limit_mb: float | None = None
    rest_change_pct: float | None = None  # the change of RSS less the RocksDB cache


@dataclass
class ChangelogFigures:
    topic: str
    live_end: int
    bound_end: int  # orders in flight plus orders ended within the horizon, at that count
    worst_excess: int  # the largest live - bound over the counts after the warm-up
    worst_excess_at_s: float | None
    kinds_end: dict[str, int]  # after the drain that follows the steady phase
    records_read: int
    bytes_read: int


@dataclass
class DiskFigures:
    topic: str
    start_bytes: int  # on disk, at the first sample after the warm-up
    end_bytes: int  # on disk, at the end of the steady phase
    segment_bytes_end: int
    bytes_per_order: float  # on disk at the end / orders of history
    growth_per_order: float | None  # (end - start) / orders placed in between


@dataclass
class Report:
    bootstrap: str
    local_broker: bool
    partitions: int
    machine: dict[str, Any]
    mix: dict[str, int]
    horizon_s: float
    state_store: str | None
    rate_per_s: float = math.nan
    rate_source: str = ""
    sweep: list[dict[str, Any]] = field(default_factory=list)
    planned_duration_s: float | None = None
    planned_orders: int | None = None
    warmup_s: float = math.nan
    warmup_rule: str = ""
    history_before: int = 0  # orders placed before the steady phase (warm-up and sweep)
    steady_s: float = math.nan
    placed: int = 0
    ended: int = 0
    completed: int = 0
    unexpected_outcomes: int = 0
    drained: bool = False
    rss: list[RssFigures] = field(default_factory=list)
    changelogs: list[ChangelogFigures] = field(default_factory=list)
    disk: list[DiskFigures] = field(default_factory=list)
    restarts: list[RestartFigures] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    keys_samples: list[KeysSample] = field(default_factory=list)
    wall_s: float = math.nan


def edges(values: Sequence[float]) -> tuple[float, float]:
    """Medians of the first and of the last EDGE_SHARE of `values` (at least one value each)."""
    width = max(1, math.ceil(len(values) * EDGE_SHARE))
    return statistics.median(values[:width]), statistics.median(values[-width:])


def rss_figures(report: Report, restarts: dict[str, int]) -> list[RssFigures]:
    steady = steady_samples(report)
    figures = []
    for name in dict.fromkeys(name for sample in steady for name in sample.rss_mb):
        samples, span = longest_process(report, name, [sample for sample in steady if name in sample.rss_mb])
        values = [sample.rss_mb[name] for sample in samples]
        start, end = edges(values)
        found = RssFigures(name, start, end, percent(start, end), min(values), max(values), restarts.get(name, 0), span)
        if all(name in sample.rocks_mb for sample in samples):
            rocks_start, rocks_end = edges([sample.rocks_mb[name] for sample in samples])
            found.rocks_start_mb, found.rocks_end_mb = rocks_start, rocks_end
            found.rocks_limit_mb = samples[-1].rocks_limit_mb.get(name)
            found.rest_change_pct = percent(start - rocks_start, end - rocks_end)
        figures.append(found)
    return figures


def percent(start: float, end: float) -> float:
    return (end - start) / start * 100 if start else math.nan


def longest_process(report: Report, name: str, samples: list[Sample]) -> tuple[list[Sample], str]:
    """Of a restarted service, the samples of its process that ran longest in the steady phase after
    the warm-up: a new process starts with empty caches, and would hide or feign growth."""
    cuts = [restart.at_s for restart in report.restarts if restart.service == name]
    if not cuts:
        return samples, "the whole steady phase"
    bounds = [-math.inf, *cuts, math.inf]
    spans = [[s for s in samples if low < s.at_s <= high] for low, high in itertools.pairwise(bounds)]
    number, longest = max(enumerate(spans), key=lambda found: len(found[1]))
    if not longest:
        return samples, "the whole steady phase"
    return longest, f"process {number + 1} of {len(spans)}, {longest[0].at_s:.0f}-{longest[-1].at_s:.0f} s"


def caches_filled_at(report: Report, earliest_s: float, latest_s: float) -> float:
    """The first sample time from `earliest_s` at which every RocksDB cache holds CACHE_FULL_SHARE
    of its limit; `latest_s` if none does before it."""
    for sample in report.samples:
        if sample.at_s < earliest_s or not sample.rocks_limit_mb:
            continue
        if sample.at_s >= latest_s:
            break
        limits = sample.rocks_limit_mb.items()
        if all(sample.rocks_mb.get(name, 0) >= CACHE_FULL_SHARE * limit for name, limit in limits):
            return sample.at_s
    return latest_s


def steady_samples(report: Report) -> list[Sample]:
    """The samples of the steady phase after the warm-up (all of the steady phase if it was shorter)."""
    steady = [sample for sample in report.samples if sample.at_s <= report.steady_s]
    warm = [sample for sample in steady if sample.at_s >= report.warmup_s]
    return warm or steady


def changelog_figures(report: Report, keys: LiveKeys, names: dict[str, str]) -> list[ChangelogFigures]:
    counts = [sample for sample in report.keys_samples if sample.at_s <= report.steady_s] or report.keys_samples
    warm = [sample for sample in counts if sample.at_s >= report.warmup_s] or counts
    figures = []
    for label, topic in names.items():
        last = counts[-1] if counts else None
        excess = [(sample.live[label] - sample.in_flight - sample.ended_in_horizon, sample.at_s) for sample in warm]
        worst = max(excess, default=(0, None))
        kinds = {kind: count for kind, count in sorted(keys.topics[topic].kinds.items()) if count}
        figures.append(
            ChangelogFigures(
                topic=label,
                live_end=last.live[label] if last else 0,
                bound_end=last.in_flight + last.ended_in_horizon if last else 0,
                worst_excess=worst[0],
                worst_excess_at_s=worst[1],
                kinds_end=kinds,
                records_read=keys.topics[topic].records,
                bytes_read=keys.topics[topic].bytes,
            )
        )
    return figures


def disk_figures(report: Report) -> list[DiskFigures]:
    steady = steady_samples(report)
    if not steady or not steady[-1].disk_bytes:
        return []
    first, last = steady[0], steady[-1]
    history = report.history_before + last.placed
    between = last.placed - first.placed
    figures = []
    for topic, end in sorted(last.disk_bytes.items()):
        start = first.disk_bytes.get(topic, 0)
        figures.append(
            DiskFigures(
                topic=topic,
                start_bytes=start,
                end_bytes=end,
                segment_bytes_end=last.segment_bytes.get(topic, 0),
                bytes_per_order=end / history if history else math.nan,
                growth_per_order=(end - start) / between if between > 0 else None,
            )
        )
    return figures


# --- the run -----------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, settings: ChoreoSettings, report: Report) -> None:
        self.args = args
        self.settings = settings
        self.report = report
        self.rng = random.Random(args.seed)
        self.run = uuid.uuid4().hex[:6]
        self.expected: dict[str, str] = {}  # order id -> its expected terminal type, until it ends
        self.placed_before_chunk = 0
        self.sent: list[str] = []  # the current chunk's orders, as they are sent
        self.recent: collections.deque[float] = collections.deque()  # when orders ended, oldest first
        self.began = math.nan
        self.data_dir: Path | None = None
        self.pids: dict[str, int] = {}
        self.stack: Stack | None = None
        self.keys: LiveKeys | None = None
        self.rocks_mb: dict[str, tuple[float, float]] = {}  # per service, from /health: (in use, limit)

    # Bookkeeping of the orders -------------------------------------------------------------------

    def on_end(self, order_id: str, ended: saga_bench.Ended) -> None:
        self.recent.append(ended.end_s)
        expected = self.expected.pop(order_id, None)
        if expected is None:
            return  # a warm-up or sweep order
        self.report.ended += 1
        self.report.completed += ended.type == OrderCompleted.__name__
        self.report.unexpected_outcomes += ended.type != expected

    @property
    def placed(self) -> int:
        return self.placed_before_chunk + len(self.sent)

    @property
    def in_flight(self) -> int:
        return self.placed - self.report.ended

    def ended_in_horizon(self) -> int:
        cutoff = time.time() - self.args.horizon
        while self.recent and self.recent[0] < cutoff:
            self.recent.popleft()
        return len(self.recent)

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    # The steady phase ----------------------------------------------------------------------------

    async def publish(self, offer: saga_bench.Offer, rate: float, until_s: float) -> None:
        limit = self.args.orders
        chunk_size = max(1, math.ceil(rate * CHUNK_S))
        chunk = 0
        while True:
            left_s = until_s - self.elapsed()
            left = chunk_size if limit is None else min(chunk_size, limit - self.placed)
            count = min(left, math.ceil(left_s * rate))
            if count <= 0:
                return
            orders = saga_bench.plan_orders(f"soak{chunk}-{self.run}-", count, self.report.mix, self.rng)
            for order in orders:
                self.expected[order.order_id] = saga_bench.EXPECTED_TERMINAL[order.outcome]
            await offer.publish(orders, rate, {}, self.sent)
            self.placed_before_chunk += len(self.sent)
            self.sent = []
            chunk += 1

    def take_sample(self) -> Sample:
        stack = self.stack
        assert stack is not None
        rss = {}
        for name, pid in {**self.pids, **stack.pids()}.items():
            if name in stack.restarting:
                continue
            usage = saga_bench.usage_of(saga_bench.Watched(name, pid))
            if usage is not None:
                rss[name] = round(usage.rss_bytes / 2**20, 1)
        usage_by_topic = topic_disk_usage(self.data_dir, self.settings.topic_prefix) if self.data_dir else {}
        sample = Sample(
            at_s=round(self.elapsed(), 1),
            placed=self.placed,
            ended=self.report.ended,
            in_flight=self.in_flight,
            ended_in_horizon=self.ended_in_horizon(),
            rss_mb=rss,
            disk_bytes={topic: usage.disk_bytes for topic, usage in usage_by_topic.items()},
            segment_bytes={topic: usage.segment_bytes for topic, usage in usage_by_topic.items()},
            rocks_mb={name: used for name, (used, _limit) in self.rocks_mb.items() if name in rss},
            rocks_limit_mb={name: limit for name, (_used, limit) in self.rocks_mb.items() if name in rss},
        )
        self.report.samples.append(sample)
        return sample

    async def count_keys(self) -> KeysSample:
        keys = self.keys
        assert keys is not None
        reading = time.monotonic()
        complete = await keys.catch_up()
        # In flight and ended at the moment the read reached its end offsets, as the count stands then.
        sample = KeysSample(
            round(self.elapsed(), 1),
            self.in_flight,
            self.ended_in_horizon(),
            {topic.name: keys.count(self.settings.topic(topic)) for topic in CHANGELOGS},
            round(time.monotonic() - reading, 2),
            complete,
        )
        self.report.keys_samples.append(sample)
        return sample

    async def read_rocks(self, client: httpx.AsyncClient) -> None:
        """What each service's RocksDB cache holds, as its /health reports it."""
        stack = self.stack
        assert stack is not None
        for name, member in stack.members.items():
            if name in stack.restarting:
                continue
            try:
                body = (await client.get(member.health_url)).json()
            except (httpx.HTTPError, ValueError):
                self.rocks_mb.pop(name, None)
                continue
            used, limit = find_number(body, "rocksdb_memory_bytes"), find_number(body, "rocksdb_memory_limit_bytes")
            if used is not None and limit:
                self.rocks_mb[name] = (round(used / 2**20, 1), round(limit / 2**20, 1))

    async def sample_loop(self, stop: asyncio.Event, client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            assert self.stack is not None
            self.stack.check()
            await self.read_rocks(client)
            self.take_sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.args.sample_s)

    async def keys_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.progress(await self.count_keys())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.args.keys_every_s)

    async def restart_loop(self, stop: asyncio.Event, client: httpx.AsyncClient) -> None:
        stack = self.stack
        assert stack is not None
        name = self.args.restart_service
        changelog = f"{name}.state"
        for threshold in self.args.restart_at:
            while self.report.history_before + self.placed < threshold:
                if stop.is_set():
                    return
                await asyncio.sleep(0.2)
            history = self.report.history_before + self.placed
            at_s = round(self.elapsed(), 1)
            # A fresh count: the periodic one may be up to --keys-every-s old.
            before = (await self.count_keys()).live.get(changelog)
            log.info("restarting %s after %d orders of history (%s live keys)", name, history, before)
            stop_s, healthy_s, body = await stack.restart(name, client, self.args.ready_timeout)
            figures = RestartFigures(
                service=name,
                threshold=threshold,
                history=history,
                at_s=at_s,
                stop_s=round(stop_s, 3),
                healthy_s=round(healthy_s, 3) if healthy_s is not None else None,
                restored_records=find_number(body, "restored_records"),
                restore_seconds=find_number(body, "restore_seconds"),
                changelog_live_keys=before,
                health=body,
            )
            self.report.restarts.append(figures)
            log.info(
                "%s stopped in %.1f s, healthy %s after its start (restored records %s, restore %s s)",
                name,
                stop_s,
                f"{healthy_s:.2f} s" if healthy_s is not None else "never",
                saga_bench.fmt(figures.restored_records),
                saga_bench.fmt(figures.restore_seconds, ".2f"),
            )

    def progress(self, keys: KeysSample) -> None:
        sample = self.report.samples[-1] if self.report.samples else None
        rss = " ".join(f"{name} {mb:.0f}" for name, mb in sample.rss_mb.items()) if sample else "-"
        disk = sum(sample.disk_bytes.values()) / 2**20 if sample and sample.disk_bytes else math.nan
        live = " ".join(f"{name.removesuffix('.state')} {count}" for name, count in keys.live.items())
        log.info(
            "%5.0f s: %d placed (%.1f/s), in flight %d, ended within %g s %d | RSS MB %s | live keys %s (read %.1f s)"
            " | broker disk %s MB",
            keys.at_s,
            self.placed,
            self.placed / keys.at_s if keys.at_s > 0 else 0.0,
            keys.in_flight,
            self.args.horizon,
            keys.ended_in_horizon,
            rss,
            live,
            keys.read_s,
            saga_bench.fmt(disk, ".1f"),
        )

    async def steady(self, offer: saga_bench.Offer, client: httpx.AsyncClient, rate: float, until_s: float) -> None:
        stop = asyncio.Event()
        self.began = time.monotonic()
        async with asyncio.TaskGroup() as group:
            group.create_task(self.sample_loop(stop, client))
            group.create_task(self.keys_loop(stop))
            restarting = group.create_task(self.restart_loop(stop, client))
            try:
                await self.publish(offer, rate, until_s)
                # The steady phase's last figures as it ends, not up to a sampling period before.
                await self.read_rocks(client)
                self.take_sample()
                self.progress(await self.count_keys())
            finally:
                self.report.steady_s = round(self.elapsed(), 1)
                self.report.placed = self.placed
                stop.set()
            # A restart under way finishes and is measured; thresholds not reached are skipped.
            await restarting

    async def drain(self, watcher: saga_bench.Watcher) -> bool:
        deadline = time.monotonic() + self.args.recover_s
        while self.in_flight > 0:
            assert self.stack is not None
            self.stack.check()
            watcher.check()
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)
        return True


async def find_rate(
    soak: Soak, path: saga_bench.UnderTest, bench: saga_bench.Bench, warmup: list[saga_bench.PlannedOrder]
) -> float:
    args, report = soak.args, soak.report
    if args.rate is not None:
        await saga_bench.warm_up(bench, path, warmup, args.rate, load_s=0)
        report.rate_source = "given"
        return float(args.rate)
    quick = bench.args
    await saga_bench.warm_up(bench, path, warmup, quick.start_rate, load_s=quick.warmup_s)
    await bench.sweep(path, quick.start_rate, quick.factor)
    figures = path.figures
    report.sweep = [
        {"offered_per_s": s.offered_per_s, "achieved_per_s": s.achieved_per_s, "flat": s.flat} for s in figures.steps
    ]
    if figures.max_flat_per_s is None:
        log.warning("the quick sweep found no flat rate; soaking at half of what its first step achieved")
        report.rate_source = "half of the first sweep step's achieved rate (no flat step)"
    else:
        report.rate_source = f"half of the quick sweep's flat rate, {figures.max_flat_per_s:.0f}/s"
    return saga_bench.half_rate(figures)


async def soak_stack(soak: Soak, run_dir: Path) -> None:
    args, settings, report = soak.args, soak.settings, soak.report
    await ensure_topics(settings)
    stack = soak.stack = Stack.start(settings, run_dir, args.horizon, args.state_store)
    soak.pids["benchmark"] = os.getpid()
    async with contextlib.AsyncExitStack() as resources:
        resources.push_async_callback(stack.stop)
        client = await resources.enter_async_context(httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S))
        await stack.wait_healthy(client, args.ready_timeout)
        # The Kafka clients are made only now: one made but never started warns when it is collected.
        watcher = saga_bench.Watcher(settings, settings.topic(AUDIT), raw=False)
        watcher.on_end = soak.on_end
        await watcher.start()
        resources.push_async_callback(watcher.stop)
        offer = saga_bench.Offer(settings, settings.topic(topic_of(OrderPlaced)), raw=False)
        await offer.start()
        resources.push_async_callback(offer.stop)
        keys = soak.keys = LiveKeys(settings, [settings.topic(topic) for topic in CHANGELOGS])
        resources.push_async_callback(keys.stop)
        await keys.start()

        bench = saga_bench.Bench(quick_sweep_args(args), sweep_report(report))
        watched = [saga_bench.Watched(name, pid) for name, pid in {**soak.pids, **stack.pids()}.items()]
        path = saga_bench.UnderTest(bench.report.choreo, offer, watcher, watched, stack.check, report.mix)
        warmup = bench.orders("w", len(saga_bench.OUTCOMES) * 2, dict.fromkeys(saga_bench.OUTCOMES, 1))
        rate = await find_rate(soak, path, bench, warmup)
        report.rate_per_s = round(rate, 2)
        report.history_before = len(watcher.ended)
        until_s = plan_duration(args, report, rate)
        log.info(
            "steady phase: %.1f sagas/s for %s, horizon %g s, warm-up %g s",
            rate,
            f"{report.planned_orders} orders" if report.planned_orders else f"{until_s:.0f} s",
            args.horizon,
            report.warmup_s,
        )
        await soak.steady(offer, client, rate, until_s)
        if args.warmup_s is None:
            report.warmup_s = caches_filled_at(report, report.warmup_s, report.steady_s / 3)
        report.drained = await soak.drain(watcher)
        # One last look after the drain, outside the steady phase's figures.
        soak.take_sample()
        soak.progress(await soak.count_keys())
        report.rss = rss_figures(report, {name: member.restarts for name, member in stack.members.items()})
        report.changelogs = changelog_figures(report, keys, {topic.name: settings.topic(topic) for topic in CHANGELOGS})
        report.disk = disk_figures(report)


def plan_duration(args: argparse.Namespace, report: Report, rate: float) -> float:
    """The steady phase's time limit, and its warm-up; --orders without --duration allows twice its pace."""
    report.planned_orders = args.orders
    if args.duration is not None:
        until_s = float(args.duration)
    elif args.orders is not None:
        until_s = 2 * args.orders / rate
    else:
        until_s = DEFAULT_DURATION_S
    report.planned_duration_s = until_s
    expected_s = min(until_s, args.orders / rate) if args.orders is not None else until_s
    # State grows until the first horizon has passed, and each RocksDB cache until it is full (which
    # the steady phase extends this to); the start figures are taken after that.
    if args.warmup_s is not None:
        report.warmup_s, report.warmup_rule = args.warmup_s, "given"
    else:
        report.warmup_s = min(2 * args.horizon, expected_s / 4)
        report.warmup_rule = (
            f"at least two horizons, until every RocksDB cache holds {CACHE_FULL_SHARE:.0%} of its limit,"
            " at most a third of the steady phase"
        )
    return until_s


def quick_sweep_args(args: argparse.Namespace) -> argparse.Namespace:
    """saga_bench's arguments for a --quick sweep, with the soak's mix, seed and timeouts."""
    parser = argparse.ArgumentParser(add_help=False)
    saga_bench.add_arguments(parser)
    quick = saga_bench.finish_arguments(parser.parse_args(["--quick"]))
    quick.mix, quick.seed, quick.ready_timeout = args.mix, args.seed, args.ready_timeout
    return quick


def sweep_report(report: Report) -> saga_bench.Report:
    return saga_bench.Report(
        mix=report.mix,
        partitions=report.partitions,
        bootstrap=report.bootstrap,
        local_broker=report.local_broker,
        quick=True,
        machine=report.machine,
        flat_definition=saga_bench.FLAT.format(settle=saga_bench.QUICK[1]),
    )


def run(args: argparse.Namespace) -> int:
    soak: Soak | None = None

    def measure(where: saga_bench.Throwaway) -> bool:
        nonlocal soak
        settings = ChoreoSettings(
            bootstrap_servers=where.bootstrap,
            topic_prefix=f"soak-{uuid.uuid4().hex[:8]}.",
            partitions=args.partitions,
            environment="test",
            # The topics' retention follows the services' horizon, as it would in production.
            order_retention=timedelta(seconds=args.horizon),
        )
        report = Report(
            bootstrap=where.bootstrap,
            local_broker=where.broker is not None,
            partitions=settings.partitions,
            machine=saga_bench.machine(),
            mix=args.mix,
            horizon_s=args.horizon,
            state_store=args.state_store,
        )
        soak = Soak(args, settings, report)
        if where.broker is not None and where.broker_pid is not None:
            soak.pids[BROKER] = where.broker_pid
            soak.data_dir = where.broker.data_dir
        else:
            soak.data_dir = args.broker_data_dir
        asyncio.run(soak_stack(soak, where.run_dir))
        report.machine["load_average_at_end"] = os.getloadavg()
        report.wall_s = round(time.monotonic() - where.began, 1)
        sys.stdout.write(render(report))
        sys.stdout.flush()
        saga_bench.write_outputs(args, report, plot)
        restarted = all(restart.healthy_s is not None for restart in report.restarts)
        return report.unexpected_outcomes == 0 and report.drained and restarted

    def processes() -> list[saga_bench.ServiceProcess]:
        return soak.stack.processes() if soak is not None and soak.stack is not None else []

    return saga_bench.run_throwaway("soak", args, measure, processes)


# --- output ------------------------------------------------------------------------------------


def mb(value: float) -> str:
    return saga_bench.fmt(value / 2**20, ".1f")


def render(report: Report) -> str:
    fmt = saga_bench.fmt
    machine = report.machine
    history_end = report.history_before + report.placed
    lines = [
        "choreo soak",
        f"  machine        {machine.get('cpus')} cpus, {machine.get('cpu_model')}; load average"
        f" {' '.join(f'{x:.1f}' for x in machine.get('load_average_at_start', ()))} at start,"
        f" {' '.join(f'{x:.1f}' for x in machine.get('load_average_at_end', ()))} at end",
        f"  broker         {report.bootstrap} ({'local, started here' if report.local_broker else 'given'}),"
        f" {report.partitions} partitions per topic",
        f"  mix            {', '.join(f'{k}={v}' for k, v in report.mix.items() if v)}",
        f"  horizon        {report.horizon_s:g} s (CHOREO_ORDER_RETENTION); state store"
        f" {report.state_store or 'as the services default'}",
        f"  rate           {fmt(report.rate_per_s, '.1f')} sagas/s offered ({report.rate_source});"
        f" {fmt(report.placed / report.steady_s if report.steady_s else None, '.1f')}/s achieved by the publisher",
        f"  steady phase   {fmt(report.steady_s)} s, warm-up {fmt(report.warmup_s)} s ({report.warmup_rule};"
        " left out of the start figures);"
        f" {report.placed} orders placed, {report.ended} ended ({report.completed} completed,"
        f" {report.ended - report.completed} compensated), unexpected outcomes {report.unexpected_outcomes},"
        f" drained {'yes' if report.drained else 'no'}",
        f"  history        {report.history_before} orders before the steady phase (warm-up and sweep),"
        f" {history_end} at the end",
    ]
    if report.sweep:
        lines.append(
            "  sweep          "
            + ", ".join(
                f"{s['offered_per_s']:.0f}/s -> {s['achieved_per_s']:.1f}/s {'flat' if s['flat'] else 'not flat'}"
                for s in report.sweep
            )
        )
    lines += [
        "",
        f"  {'RSS (MB)':<16}{'start':>9}{'end':>9}{'change':>9}{'min':>9}{'max':>9}{'restarts':>10}"
        f"{'RocksDB start':>15}{'end':>7}{'limit':>7}{'RSS less RocksDB':>18}   span",
    ]
    for rss in report.rss:
        lines.append(
            f"  {rss.name:<16}{rss.start_mb:>9.1f}{rss.end_mb:>9.1f}{fmt(rss.change_pct, '+.1f'):>8}%"
            f"{rss.min_mb:>9.1f}{rss.max_mb:>9.1f}{rss.restarts:>10}{fmt(rss.rocks_start_mb, '.1f'):>15}"
            f"{fmt(rss.rocks_end_mb, '.1f'):>7}{fmt(rss.rocks_limit_mb, '.0f'):>7}"
            f"{fmt(rss.rest_change_pct, '+.1f'):>17}%   {rss.span}"
        )
    lines.append(
        f"  (start, end: medians of the first and last {EDGE_SHARE:.0%} of the samples after the warm-up, of the"
        " process that ran longest; RocksDB: its cache as /health reports it, memtables included)"
    )
    lines += [
        "",
        f"  {'changelog':<18}{'live keys':>10}{'bound':>8}{'worst excess':>14}   keys by kind after the drain",
    ]
    for log_figures in report.changelogs:
        kinds = ", ".join(f"{kind} {count}" for kind, count in log_figures.kinds_end.items()) or "-"
        lines.append(
            f"  {log_figures.topic:<18}{log_figures.live_end:>10}{log_figures.bound_end:>8}"
            f"{log_figures.worst_excess:>14}   {kinds}"
        )
    lines.append(
        "  (live keys at the last count of the steady phase; bound: orders in flight + orders ended within the"
        " horizon at that count; worst excess: the largest live keys - bound after the warm-up)"
    )
    if report.disk:
        lines += [
            "",
            f"  {'broker disk':<26}{'start MB':>10}{'end MB':>10}{'bytes/order':>13}{'growth/order':>14}",
        ]
        for disk in report.disk:
            lines.append(
                f"  {disk.topic:<26}{mb(disk.start_bytes):>10}{mb(disk.end_bytes):>10}"
                f"{disk.bytes_per_order:>13.0f}{fmt(disk.growth_per_order, '.0f'):>14}"
            )
        total_end = sum(disk.end_bytes for disk in report.disk)
        lines.append(
            f"  {'all topics':<26}{mb(sum(d.start_bytes for d in report.disk)):>10}{mb(total_end):>10}"
            f"{fmt(total_end / history_end if history_end else None):>13}"
        )
        lines.append(
            "  (on disk as du counts it; bytes/order: at the end over the orders of history; growth/order:"
            " from the first sample after the warm-up to the end of the steady phase, over the orders placed"
            " in between)"
        )
    else:
        lines += ["", "  broker disk: not measured (a given broker; --broker-data-dir names its log folder)"]
    lines += [
        "",
        f"  {'restart':<12}{'threshold':>10}{'history':>9}{'at s':>8}{'stop s':>8}{'start->healthy s':>18}"
        f"{'restored records':>18}{'restore s':>11}{'live keys':>11}",
    ]
    for restart in report.restarts:
        lines.append(
            f"  {restart.service:<12}{restart.threshold:>10}{restart.history:>9}{restart.at_s:>8.0f}"
            f"{restart.stop_s:>8.2f}{fmt(restart.healthy_s, '.2f'):>18}{fmt(restart.restored_records):>18}"
            f"{fmt(restart.restore_seconds, '.2f'):>11}{fmt(restart.changelog_live_keys):>11}"
        )
    if not report.restarts:
        lines.append("  (no threshold of --restart-at was reached)")
    lines.append(f"  wall time {fmt(report.wall_s)} s")
    return "\n".join(lines) + "\n"


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ((rss_axes, keys_axes), (disk_axes, restart_axes)) = plt.subplots(2, 2, figsize=(15, 10))
    minutes = [sample.at_s / 60 for sample in report.samples]
    # The broker's JVM takes several times a service's memory; on the same scale the services' lines
    # would be flat whatever they did, so it gets the right-hand scale.
    broker_axes = rss_axes.twinx()
    for name in dict.fromkeys(name for sample in report.samples for name in sample.rss_mb):
        points = [(s.at_s / 60, s.rss_mb[name]) for s in report.samples if name in s.rss_mb]
        axes, style = (broker_axes, "--") if name == BROKER else (rss_axes, "-")
        (line,) = axes.plot([x for x, _ in points], [y for _, y in points], style,
                            color="black" if axes is broker_axes else None, label=name)  # fmt: skip
        cache = [(s.at_s / 60, s.rocks_mb[name]) for s in report.samples if name in s.rocks_mb]
        if cache:
            rss_axes.plot([x for x, _ in cache], [y for _, y in cache], ":", color=line.get_color(), linewidth=1)
    for restart in report.restarts:
        rss_axes.axvline(restart.at_s / 60, linestyle=":", color="grey")
    rss_axes.set_title(f"RSS per process ({BROKER} dashed, right scale); fine dots: its RocksDB cache; grey: a restart")
    rss_axes.set_ylabel("MB")
    broker_axes.set_ylabel(f"MB, {BROKER}")
    broker_axes.legend(fontsize="small", loc="lower right")

    counts = report.keys_samples
    at = [sample.at_s / 60 for sample in counts]
    for topic in CHANGELOGS:
        keys_axes.plot(at, [sample.live[topic.name] for sample in counts], marker=".", label=topic.name)
    keys_axes.plot(minutes, [s.in_flight for s in report.samples], color="black", label="orders in flight")
    keys_axes.plot(
        minutes,
        [s.in_flight + s.ended_in_horizon for s in report.samples],
        color="black",
        linestyle="--",
        label=f"in flight + ended within {report.horizon_s:g} s",
    )
    keys_axes.set_title("live keys per changelog against the orders in flight")
    keys_axes.set_ylabel("keys")

    colours = plt.get_cmap("tab20")
    for number, name in enumerate(dict.fromkeys(name for sample in report.samples for name in sample.disk_bytes)):
        disk_axes.plot(minutes, [s.disk_bytes.get(name, 0) / 2**20 for s in report.samples], color=colours(number % 20),
                       linestyle="-" if number < 20 else "--", label=name)  # fmt: skip
    disk_axes.set_title("broker disk per topic")
    disk_axes.set_ylabel("MB")

    labels = [f"{r.service}\nafter {r.history:,} orders" for r in report.restarts]
    positions = range(len(report.restarts))
    restart_axes.bar(
        [p - 0.2 for p in positions], [r.healthy_s or 0 for r in report.restarts], 0.4, label="start -> /health 200"
    )
    restart_axes.bar(
        [p + 0.2 for p in positions],
        [r.restore_seconds or 0 for r in report.restarts],
        0.4,
        label="restore_seconds (the service's own)",
    )
    restart_axes.set_xticks(list(positions), labels)
    restart_axes.set_title("restore time of a restarted service")
    restart_axes.set_ylabel("seconds")

    for axes in (rss_axes, keys_axes, disk_axes):
        axes.set_xlabel("minutes into the steady phase")
        axes.axvline(report.warmup_s / 60, linestyle="--", color="lightgrey")
        if math.isfinite(report.steady_s):
            axes.axvline(report.steady_s / 60, linestyle="--", color="lightgrey")
    for axes in (rss_axes, keys_axes, disk_axes, restart_axes):
        axes.grid(True, alpha=0.3)
        axes.legend(
            fontsize="small", loc="best" if axes is restart_axes else "upper left", ncol=2 if axes is disk_axes else 1
        )
    figure.suptitle(
        f"choreo soak: {report.rate_per_s:.1f} sagas/s, horizon {report.horizon_s:g} s, "
        f"{report.history_before + report.placed:,} orders of history (dashed: end of warm-up, end of steady phase)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --- arguments ---------------------------------------------------------------------------------


def restart_points(text: str) -> list[int]:
    """`10000,100000`: orders of history after which to restart; empty for none."""
    try:
        points = sorted(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated whole numbers") from error
    if any(point < 0 for point in points):
        raise argparse.ArgumentTypeError(f"{text!r}: negative")
    return points


def add_arguments(parser: argparse.ArgumentParser) -> None:
    positive = saga_bench.positive_float
    parser.add_argument("--rate", type=positive, default=None, help="sagas/s (default: half the quick sweep's flat)")
    parser.add_argument("--duration", type=positive, default=None, help=f"seconds (default {DEFAULT_DURATION_S:g})")
    parser.add_argument(
        "--orders", type=int, default=None, help="stop after this many orders (within twice their pace)"
    )
    parser.add_argument("--horizon", type=positive, default=60.0, help="order retention in seconds (default 60)")
    parser.add_argument(
        "--restart-at",
        type=restart_points,
        default=restart_points(DEFAULT_RESTART_AT),
        metavar="N,N",
        help=f"orders of history after which to restart a service (default {DEFAULT_RESTART_AT}; '' for none)",
    )
    parser.add_argument(
        "--restart-service", choices=SERVICES, default="inventory", help="the service to restart (default inventory)"
    )
    parser.add_argument("--state-store", choices=["disk", "memory"], default=None, help="CHOREO_STATE_STORE")
    parser.add_argument(
        "--mix",
        type=saga_bench.parse_mix,
        default=saga_bench.parse_mix(saga_bench.DEFAULT_MIX),
        help=f"outcome weights (default {saga_bench.DEFAULT_MIX})",
    )
    parser.add_argument("--json", type=Path, default=Path("bench-results/soak.json"), metavar="PATH")
    parser.add_argument("--png", type=Path, default=Path("bench-results/soak.png"), metavar="PATH")
    parser.add_argument("--bootstrap", default=None, metavar="HOST:PORT", help="use this broker, start none")
    parser.add_argument(
        "--broker-data-dir", type=Path, default=None, metavar="PATH", help="log.dirs of a --bootstrap broker"
    )
    parser.add_argument("--partitions", type=int, default=ChoreoSettings().partitions, help="per topic (default 6)")
    parser.add_argument(
        "--warmup-s",
        type=float,
        default=None,
        help="default: 2 horizons (at most 1/4 of the run), then until the RocksDB caches are full (at most 1/3)",
    )
    parser.add_argument("--sample-s", type=positive, default=10.0, help="seconds between RSS and disk samples")
    parser.add_argument("--keys-every-s", type=positive, default=60.0, help="seconds between changelog counts")
    parser.add_argument("--ready-timeout", type=positive, default=180.0, help="seconds for a service's /health")
    parser.add_argument("--recover-s", type=positive, default=120.0, help="seconds for the orders in flight to end")
    parser.add_argument("--seed", type=int, default=1, help="seed of the order generator")
    parser.add_argument("--keep-run-dir", action="store_true", help="keep broker data, state and process logs")


def finish_arguments(args: argparse.Namespace) -> argparse.Namespace:
    if args.orders is not None and args.orders < 1:
        raise SystemExit("--orders must be at least 1")
    if args.broker_data_dir is not None and args.bootstrap is None:
        raise SystemExit("--broker-data-dir goes with --bootstrap (a local broker's folder is known)")
    return args


def configure_logging() -> None:
    """Progress on stderr, the figures on stdout, as in saga_bench; not every /health request."""
    saga_bench.configure_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=(__doc__ or "").split("\n")[0])
    add_arguments(parser)
    args = finish_arguments(parser.parse_args(argv))
    configure_logging()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

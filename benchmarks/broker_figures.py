"""What a long run leaves on the broker: live keys of compacted topics and the disk each topic takes.

Shared by the soak benchmarks (benchmarks.soak, benchmarks.monitor_soak).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from services.common.kafka import consumer as make_consumer
from services.common.settings import ChoreoSettings

# One read gives up after this long and goes on from where it stopped at the next call, so a
# broker that answers slowly cannot stall the caller's other work for long.
READ_BUDGET_S = 60.0
FETCH_TIMEOUT_MS = 500
MAX_POLL_RECORDS = 2000


async def partitions_of(reader: Any, name: str) -> list[TopicPartition]:
    if not reader.partitions_for_topic(name):
        await reader._client.force_metadata_update()  # a fresh client knows no topic yet
    return [TopicPartition(name, p) for p in sorted(reader.partitions_for_topic(name) or [])]


def key_kind(key: bytes) -> str:
    """`order` for `order:o-1`, `sku` for `sku:WIDGET-1`: what a key of a changelog describes."""
    kind, sep, _ = key.partition(b":")
    return kind.decode(errors="replace") if sep else "(no prefix)"


@dataclass
class TopicKeys:
    live: set[bytes]
    kinds: Counter[str]
    records: int = 0
    bytes: int = 0


class LiveKeys:
    """The live keys of compacted topics (the last value per key; a null value deletes the key).

    Each `catch_up` reads on from where the previous one stopped, up to the end offsets of that
    moment, so a series of counts costs one read of each topic, not one per count. Only live keys
    are kept: the memory follows what the topics hold now, not every key they ever held.
    """

    def __init__(self, settings: ChoreoSettings, topics: Sequence[str]) -> None:
        self.settings = settings
        self.topics = {name: TopicKeys(set(), Counter()) for name in topics}
        self._reader: Any = None
        self._tps: list[TopicPartition] = []
        # Two reads at once would pause and resume the partitions under each other's feet.
        self._reading = asyncio.Lock()

    async def start(self) -> None:
        reader = make_consumer(self.settings, group_id=None, max_poll_records=MAX_POLL_RECORDS)
        await reader.start()
        self._reader = reader
        for name in self.topics:
            self._tps += await partitions_of(reader, name)
        reader.assign(self._tps)
        await reader.seek_to_beginning(*self._tps)
        # Between reads the fetcher would keep reading ahead for nobody.
        reader.pause(*self._tps)

    async def stop(self) -> None:
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None

    def count(self, name: str) -> int:
        return len(self.topics[name].live)

    async def catch_up(self, budget_s: float = READ_BUDGET_S) -> bool:
        """Read up to the current end of every topic; False if the budget ran out first."""
        async with self._reading:
            return await self._catch_up(budget_s)

    async def _catch_up(self, budget_s: float) -> bool:
        reader = self._reader
        if reader is None:
            raise RuntimeError("LiveKeys.catch_up before start")
        # With read_committed these are the last stable offsets: nothing past them is readable yet.
        ends = await reader.end_offsets(self._tps)
        behind = [tp for tp in self._tps if await reader.position(tp) < ends[tp]]
        deadline = time.monotonic() + budget_s
        reader.resume(*behind)
        try:
            while behind and time.monotonic() < deadline:
                batch = await reader.getmany(*behind, timeout_ms=FETCH_TIMEOUT_MS)
                for tp, records in batch.items():
                    self._take(self.topics[tp.topic], records)
                behind = [tp for tp in behind if await reader.position(tp) < ends[tp]]
                # A long read must not keep the caller's loop from its other work.
                await asyncio.sleep(0)
        finally:
            reader.pause(*self._tps)
        return not behind

    @staticmethod
    def _take(topic: TopicKeys, records: Sequence[Any]) -> None:
        for record in records:
            key = record.key or b""
            topic.records += 1
            topic.bytes += len(key) + len(record.value or b"")
            if record.value is None:
                if key in topic.live:
                    topic.live.discard(key)
                    topic.kinds[key_kind(key)] -= 1
            elif key not in topic.live:
                topic.live.add(key)
                topic.kinds[key_kind(key)] += 1


@dataclass(frozen=True)
class DiskUsage:
    segment_bytes: int  # the sizes of the log segments: the records and their batch headers
    disk_bytes: int  # what every file of the topic's partition folders takes on disk (as `du` counts it)


def topic_disk_usage(data_dir: Path, prefix: str) -> dict[str, DiskUsage]:
    """Per topic whose name starts with `prefix` (named without it): the partition folders under `data_dir`.

    The broker keeps partition p of a topic in `<log.dirs>/<topic>-<p>/`. Index files are
    preallocated as sparse files, so their apparent size says nothing; the blocks they take do.
    """
    segments: Counter[str] = Counter()
    disk: Counter[str] = Counter()
    try:
        folders = [entry for entry in os.scandir(data_dir) if entry.is_dir() and entry.name.startswith(prefix)]
    except FileNotFoundError:
        return {}
    for folder in folders:
        topic, _, partition = folder.name.removeprefix(prefix).rpartition("-")
        if not topic or not partition.isdigit():
            continue  # a folder the broker is deleting or moving (`...-delete`, `...-future`)
        try:
            files = list(os.scandir(folder.path))
        except FileNotFoundError:
            continue
        for file in files:
            try:
                stat = file.stat()
            except FileNotFoundError:
                continue  # a segment deleted by retention while we looked
            disk[topic] += stat.st_blocks * 512
            if file.name.endswith(".log"):
                segments[topic] += stat.st_size
    return {topic: DiskUsage(segments[topic], disk[topic]) for topic in sorted(disk)}

"""What the monitor asks the outside world: a service's /health, and what a topic already holds."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.topics import AUDIT, MONITOR_ALERTS
from services.common.kafka import admin_client, consumer
from services.common.settings import ChoreoSettings
from services.monitor.domain import PendingAlert

log = logging.getLogger(__name__)

READ_DEADLINE_S = 10.0
POLL_MS = 200


class HttpProbe:
    """GET <url>: healthy on a 2xx answer; anything else (status, refusal, timeout) is the failure's detail.

    aiohttp rather than httpx: at sub-second intervals the client's own cost per request dominates,
    and aiohttp's is about a quarter of httpx's.
    """

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def check(self, url: str, timeout_s: float) -> tuple[bool, str]:
        if self._session is None:
            # No keep-alive: a restarted service must be reached on a new connection, not a dead one.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                status = response.status
        except TimeoutError:
            return False, f"no answer within {timeout_s:g} s"
        except aiohttp.ClientError as error:
            return False, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return 200 <= status < 300, f"HTTP {status}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class LogProbe:
    """Reads committed records by offset or time, with no consumer group, to answer two questions.

    `caught_up`: is there anything on an audit partition beyond what the monitor processed? (Offsets
    alone cannot say: under transactions the last offsets of a partition are commit markers.)
    `alert_published`: is a given alert already on `monitor.alerts`?
    """

    def __init__(self, settings: ChoreoSettings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            self._consumer = consumer(self.settings, group_id=None)
            await self._consumer.start()
        return self._consumer

    async def caught_up(self, partition: int, processed_offset: int) -> bool:
        async with self._lock:
            reader = await self._started()
            tp = TopicPartition(self.settings.topic(AUDIT), partition)
            reader.assign([tp])
            end = (await reader.end_offsets([tp]))[tp]
            if processed_offset + 1 >= end:
                return True
            reader.seek(tp, processed_offset + 1)
            deadline = time.monotonic() + READ_DEADLINE_S
            while await reader.position(tp) < end:
                batch = await reader.getmany(tp, timeout_ms=POLL_MS, max_records=1)
                if batch.get(tp):
                    return False
                if time.monotonic() > deadline:
                    return False  # undecided: the next tick asks again
            return True

    async def alert_published(self, pending: PendingAlert) -> bool:
        async with self._lock:
            reader = await self._started()
            name = self.settings.topic(MONITOR_ALERTS)
            partitions = reader.partitions_for_topic(name) or set()
            if not partitions:
                await reader._client.force_metadata_update()
                partitions = reader.partitions_for_topic(name) or set()
            tps = [TopicPartition(name, p) for p in sorted(partitions)]
            reader.assign(tps)
            starts = await reader.offsets_for_times({tp: pending.since_ms for tp in tps})
            ends = await reader.end_offsets(tps)
            wanted_key = pending.subject.encode()
            wanted_id = str(pending.event_id)
            for tp in tps:
                found = starts.get(tp)
                if found is None:
                    continue  # nothing on this partition since the alert was decided
                reader.seek(tp, found.offset)
                deadline = time.monotonic() + READ_DEADLINE_S
                while await reader.position(tp) < ends[tp]:
                    if time.monotonic() > deadline:
                        # Undecided; sending now could repeat the alert, so the caller retries later.
                        raise TimeoutError(f"could not read {name} to its end within {READ_DEADLINE_S:g} s")
                    batch = await reader.getmany(tp, timeout_ms=POLL_MS)
                    for record in batch.get(tp, []):
                        if record.key == wanted_key and _event_id(record.value) == wanted_id:
                            return True
            return False

    async def resume_offsets(self, group: str) -> dict[int, int]:
        admin = admin_client(self.settings)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        audit = self.settings.topic(AUDIT)
        return {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == audit and meta.offset >= 0}

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


def _event_id(value: bytes | None) -> str | None:
    try:
        document = json.loads(value or b"")
    except ValueError:
        return None
    found = document.get("event_id") if isinstance(document, dict) else None
    return found if isinstance(found, str) else None

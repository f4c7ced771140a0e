"""Reading `monitor.state` straight from the broker: the monitor's latest state, running or not.

A plain consumer without a group reads every partition to its end and keeps the last value per
key (a tombstone removes the key), which is exactly what the monitor restores on start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiokafka import TopicPartition
from pydantic import ValidationError

from schemas.topics import MONITOR_STATE
from services.common.kafka import consumer as make_consumer
from services.common.settings import ChoreoSettings
from services.monitor.domain import (
    SAGA_PREFIX,
    SERVICE_PREFIX,
    STATS_PREFIX,
    PartitionStats,
    SagaRecord,
    ServiceHealth,
)

POLL_MS = 500


class StateTopicMissingError(RuntimeError):
    """`monitor.state` does not exist on the broker."""


@dataclass
class MonitorState:
    """The latest record of every key, as raw JSON bytes, and the records it decodes to."""

    raw: dict[str, bytes] = field(default_factory=dict)

    def services(self) -> list[ServiceHealth]:
        return sorted(
            (ServiceHealth.model_validate_json(v) for k, v in self.raw.items() if k.startswith(SERVICE_PREFIX)),
            key=lambda health: health.service,
        )

    def sagas(self) -> list[SagaRecord]:
        return [SagaRecord.model_validate_json(v) for k, v in self.raw.items() if k.startswith(SAGA_PREFIX)]

    def stats(self) -> list[PartitionStats]:
        return [PartitionStats.model_validate_json(v) for k, v in self.raw.items() if k.startswith(STATS_PREFIX)]

    def valid(self) -> bool:
        try:
            self.services(), self.sagas(), self.stats()
        except ValidationError:
            return False
        return True


async def read_state(settings: ChoreoSettings, *, stall_timeout: float = 30.0) -> MonitorState:
    reader = make_consumer(settings, group_id=None)
    await reader.start()
    try:
        name = settings.topic(MONITOR_STATE)
        partitions = reader.partitions_for_topic(name)
        if not partitions:
            await reader._client.force_metadata_update()
            partitions = reader.partitions_for_topic(name)
        if not partitions:
            raise StateTopicMissingError(f"topic {name} does not exist; has the monitor ever run?")
        tps = [TopicPartition(name, p) for p in sorted(partitions)]
        reader.assign(tps)
        ends = await reader.end_offsets(tps)
        await reader.seek_to_beginning(*tps)
        state = MonitorState()
        for tp in tps:
            deadline = time.monotonic() + stall_timeout
            while await reader.position(tp) < ends[tp]:
                batch = await reader.getmany(tp, timeout_ms=POLL_MS)
                records = batch.get(tp, [])
                if records:
                    deadline = time.monotonic() + stall_timeout
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"{name} partition {tp.partition} stopped short of its end offset")
                for record in records:
                    key = record.key.decode() if record.key is not None else ""
                    if record.value is None:
                        state.raw.pop(key, None)
                    else:
                        state.raw[key] = record.value
        return state
    finally:
        await reader.stop()

"""Dead letters: the headers a service gives one, and reading, selecting and replaying them.

A service dead-letters a message it cannot accept (`TaskContext.dead_letter`): the `DeadLetter`
value keeps the reason, the origin and the original bytes; the headers repeat the origin and carry
the original record's own headers. A replay sends the original key, value and headers back to the
original topic, with `choreo-replay-count` one higher than the original had; the services copy that
header into the next dead letter, so a message that keeps failing is refused after a set number of
replays instead of going round forever.
"""

from __future__ import annotations

import base64
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from aiokafka import TopicPartition
from pydantic import ValidationError

from schemas.deadletter import (
    DLT_CONSUMER,
    DLT_HEADER_PREFIX,
    DLT_ORIGINAL_OFFSET,
    DLT_ORIGINAL_PARTITION,
    DLT_ORIGINAL_TIMESTAMP,
    DLT_ORIGINAL_TOPIC,
    DLT_REASON,
    DLT_REASON_MAX_BYTES,
    DLT_TIME,
    REPLAY_COUNT,
    DeadLetter,
)
from schemas.topics import DEAD_LETTER
from services.common.kafka import admin_client, batches_until, partition_for
from services.common.kafka import consumer as make_consumer
from services.common.kafka import producer as make_producer
from services.common.settings import ChoreoSettings

Header = tuple[str, bytes | None]
"""A Kafka header as the clients read it: a value may be null."""

_ELLIPSIS = "…".encode()


def dead_letter_headers(
    letter: DeadLetter, original: Iterable[tuple[str, bytes]], original_timestamp_ms: int
) -> tuple[tuple[str, bytes], ...]:
    """The headers of `letter`'s record: the original record's own, then its origin.

    An original header named with the dead-letter prefix is left out: on a dead letter those
    headers describe this rejection, and a stale one would contradict it.
    """
    copied = tuple((name, value) for name, value in original if not name.startswith(DLT_HEADER_PREFIX))
    return (
        *copied,
        (DLT_ORIGINAL_TOPIC, letter.topic.encode()),
        (DLT_ORIGINAL_PARTITION, str(letter.partition).encode()),
        (DLT_ORIGINAL_OFFSET, str(letter.offset).encode()),
        (DLT_ORIGINAL_TIMESTAMP, str(original_timestamp_ms).encode()),
        (DLT_REASON, truncated(letter.reason, DLT_REASON_MAX_BYTES)),
        (DLT_CONSUMER, letter.consumer.encode()),
        (DLT_TIME, rfc3339_ms(letter.dead_lettered_at).encode()),
    )


def truncated(text: str, limit: int) -> bytes:
    """`text` as UTF-8 in at most `limit` bytes, cut on a character boundary and marked with an ellipsis."""
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[: limit - len(_ELLIPSIS)].decode(errors="ignore").encode() + _ELLIPSIS


def rfc3339_ms(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _decoded(raw: str | None) -> bytes | None:
    return base64.b64decode(raw) if raw is not None else None


class DeadLetterTopicMissingError(RuntimeError):
    """The dead-letter topic does not exist on the broker."""


@dataclass(frozen=True, order=True)
class LetterId:
    """Where a dead letter sits on the dead-letter topic: `partition:offset`."""

    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.partition}:{self.offset}"

    @classmethod
    def parse(cls, text: str) -> LetterId:
        partition, sep, offset = text.partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit():
            raise ValueError(f"{text!r} is not a dead letter id (PARTITION:OFFSET, for example 3:17)")
        return cls(int(partition), int(offset))


@dataclass(frozen=True)
class StoredDeadLetter:
    """One record of the dead-letter topic, read back."""

    id: LetterId
    letter: DeadLetter
    headers: tuple[Header, ...]

    @property
    def key(self) -> bytes | None:
        return _decoded(self.letter.key_base64)

    @property
    def value(self) -> bytes | None:
        return _decoded(self.letter.value_base64)

    @property
    def original_headers(self) -> tuple[Header, ...]:
        """The headers the original record had, in their order."""
        return tuple((name, value) for name, value in self.headers if not name.startswith(DLT_HEADER_PREFIX))

    @property
    def replay_count(self) -> int | None:
        """How often the original's lineage was replayed before (0 if never); None when its header is unreadable."""
        found = [value for name, value in self.original_headers if name == REPLAY_COUNT]
        if not found:
            return 0
        text = (found[-1] or b"").decode(errors="replace").strip()
        return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class UnreadableDeadLetter:
    """A record on the dead-letter topic that is not a `DeadLetter` (written by something else)."""

    id: LetterId
    error: str


@dataclass(frozen=True)
class DeadLetterLog:
    letters: list[StoredDeadLetter]
    unreadable: list[UnreadableDeadLetter]


async def read_dead_letters(
    settings: ChoreoSettings, ids: Collection[LetterId] | None = None, *, stall_timeout: float = 30.0
) -> DeadLetterLog:
    """Every committed dead letter from the beginning to the end the topic has now; only `ids` if given.

    With ids, each partition is read only over the range they span.
    """
    name = settings.topic(DEAD_LETTER)
    counts = await partition_counts(settings, [name])
    if name not in counts:
        raise DeadLetterTopicMissingError(f"topic {name} does not exist: run `choreo topics create`")
    wanted = set(ids) if ids is not None else None
    partitions = sorted({i.partition for i in wanted}) if wanted is not None else list(range(counts[name]))
    tps = [TopicPartition(name, partition) for partition in partitions if partition < counts[name]]
    if not tps:
        return DeadLetterLog([], [])
    consumer = make_consumer(settings, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        # Under read_committed these are the last stable offsets: an open transaction cannot make us wait.
        ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
        beginnings: dict[TopicPartition, int] = await consumer.beginning_offsets(tps)
        if wanted is not None:
            for tp in tps:
                offsets = [i.offset for i in wanted if i.partition == tp.partition]
                consumer.seek(tp, max(min(offsets), beginnings[tp]))
                ends[tp] = min(ends[tp], max(offsets) + 1)
        else:
            for tp in tps:
                consumer.seek(tp, beginnings[tp])
        records = await _read_until(consumer, ends, name, stall_timeout)
    finally:
        await consumer.stop()
    found = DeadLetterLog([], [])
    for record in records:
        letter_id = LetterId(record.partition, record.offset)
        if wanted is not None and letter_id not in wanted:
            continue
        try:
            letter = DeadLetter.model_validate_json(record.value or b"")
        except ValidationError as error:
            found.unreadable.append(UnreadableDeadLetter(letter_id, f"not a DeadLetter: {error.errors()[0]['msg']}"))
            continue
        found.letters.append(StoredDeadLetter(letter_id, letter, tuple(record.headers or ())))
    return found


async def _read_until(consumer: Any, ends: dict[TopicPartition, int], name: str, stall_timeout: float) -> list[Any]:
    records: list[Any] = []
    async for batch in batches_until(consumer, ends, name, stall_timeout):
        for tp, rows in batch.items():
            records.extend(row for row in rows if row.offset < ends[tp])
    return sorted(records, key=lambda row: (row.partition, row.offset))


async def partition_counts(settings: ChoreoSettings, names: Iterable[str]) -> dict[str, int]:
    """The partition count of each of `names` that exists on the broker (asking creates nothing)."""
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        present = sorted(set(names) & existing)
        described: list[dict[str, Any]] = await admin.describe_topics(present) if present else []
    finally:
        await admin.close()
    return {topic["topic"]: len(topic["partitions"]) for topic in described if topic["error_code"] == 0}


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on; a filter left at None lets every one through."""

    reason: str | None = None
    """A substring of the reason, any case."""
    topic: str | None = None
    """The original topic, with or without the topic prefix."""
    consumer: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, stored: StoredDeadLetter, topic_prefix: str) -> bool:
        letter = stored.letter
        return (
            (self.reason is None or self.reason.casefold() in letter.reason.casefold())
            and (self.topic is None or letter.topic in (self.topic, topic_prefix + self.topic))
            and (self.consumer is None or letter.consumer == self.consumer)
            and (self.since is None or letter.dead_lettered_at >= self.since)
            and (self.until is None or letter.dead_lettered_at <= self.until)
        )


Outcome = Literal["send", "refuse", "skip"]


@dataclass(frozen=True)
class Replay:
    """What a replay does with one dead letter: send it (where to, with which headers), refuse or skip it."""

    stored: StoredDeadLetter
    outcome: Outcome
    detail: str
    """For a send, where it goes; else why not."""
    headers: tuple[Header, ...] = ()
    partition: int | None = None
    """The partition it goes to: its key's (murmur2), or for a record without a key, the original one."""
    same_as: LetterId | None = None
    """Skipped as another dead letter of the same original record, which is replayed (or refused) instead."""

    @property
    def topic(self) -> str:
        return self.stored.letter.topic


def plan_replays(
    letters: Sequence[StoredDeadLetter], *, max_replays: int, partitions: Mapping[str, int]
) -> list[Replay]:
    """Decide for each dead letter; `partitions` holds the partition count of every topic that exists.

    Each service that reads a topic dead-letters a bad record there on its own, so one record can have
    a dead letter from each: it goes back once, since each of them reads it again from the topic. The
    first of its dead letters decides; the others are skipped.
    """
    first_of: dict[tuple[str, int, int], LetterId] = {}
    replays: list[Replay] = []
    for stored in letters:
        letter = stored.letter
        # A request handed over in process was never on its topic: it has no offset to share.
        origin = (letter.topic, letter.partition, letter.offset) if letter.offset >= 0 else None
        first = first_of.get(origin) if origin is not None else None
        if first is not None:
            replays.append(
                Replay(stored, "skip", f"the same record as {first} (dead-lettered by each consumer)", same_as=first)
            )
            continue
        if origin is not None:
            first_of[origin] = stored.id
        replays.append(_plan(stored, max_replays, partitions))
    return replays


def _plan(stored: StoredDeadLetter, max_replays: int, partitions: Mapping[str, int]) -> Replay:
    letter = stored.letter
    count = stored.replay_count
    if count is None:
        return Replay(stored, "refuse", f"its {REPLAY_COUNT} header is not a count, so the replay limit cannot hold")
    if count >= max_replays:
        return Replay(
            stored,
            "refuse",
            f"replayed {count} time{'' if count == 1 else 's'} already (limit {max_replays}, --max-replays); "
            "look into the reason instead",
        )
    partition_count = partitions.get(letter.topic)
    if partition_count is None:
        return Replay(stored, "skip", f"topic {letter.topic} does not exist on the broker")
    key = stored.key
    if key is not None:
        partition = partition_for(key, partition_count)
    elif letter.partition < partition_count:
        partition = letter.partition
    else:
        return Replay(stored, "skip", f"no key, and partition {letter.partition} is gone from {letter.topic}")
    kept = tuple(header for header in stored.original_headers if header[0] != REPLAY_COUNT)
    headers = (*kept, (REPLAY_COUNT, str(count + 1).encode()))
    return Replay(stored, "send", f"{letter.topic} partition {partition}", headers, partition)


@dataclass(frozen=True)
class Sent:
    replay: Replay
    partition: int
    offset: int


async def send_replays(settings: ChoreoSettings, replays: Sequence[Replay]) -> list[Sent]:
    """Send every replay whose outcome is `send` with an idempotent producer; acknowledged by all replicas.

    A keyed record is partitioned by the client (murmur2, as every producer of Choreo's topics), so it
    lands where its key belongs even if the original sat elsewhere.
    """
    sending = [replay for replay in replays if replay.outcome == "send"]
    if not sending:
        return []
    client = make_producer(settings)
    await client.start()
    try:
        pending = [
            await client.send(
                replay.topic,
                replay.stored.value,
                key=replay.stored.key,
                partition=None if replay.stored.key is not None else replay.partition,
                headers=list(replay.headers),
            )
            for replay in sending
        ]
        delivered = [await delivery for delivery in pending]
    finally:
        await client.stop()
    return [Sent(replay, meta.partition, meta.offset) for replay, meta in zip(sending, delivered, strict=True)]

"""The runner's transactions as KIP-890's second version has them, sent on aiokafka's connections.

A transaction is three requests instead of aiokafka's five: the records (Produce v12, one request a
leader) and the offsets (TxnOffsetCommit v5) are sent together, and EndTxn v5 once both are answered.
The leaders and the group coordinator add their partitions to the transaction themselves, so there is
no AddPartitionsToTxn or AddOffsetsToTxn round trip, and EndTxn answers with the epoch of the next
transaction (each one bumps it), whose sequences start again at 0.

A request answered with an error that time may mend (a leader or coordinator moving, replicas short)
is sent again until `CALL_TIMEOUT_S` has passed; a record batch keeps its sequence, so the leader
writes it once. A fencing error raises `FencedError`; anything else fails the transaction, and the
runner's next producer of its tasks fences this one, which settles it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from aiokafka import TopicPartition
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.errors import KafkaError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.protocol.api import RequestStruct
from aiokafka.protocol.transaction import InitProducerIdRequest_v0 as InitProducerIdRequestV0

from services.common.settings import ChoreoSettings
from services.common.transactions.kip890_requests import (
    NO_TAGS,
    ApiVersionsRequestV3,
    EndTxnRequestV5,
    Exactly,
    ProduceRequestV12,
    TxnOffsetCommitRequestV5,
    finalized_features,
)
from services.common.transactions.records import (
    BATCH_BYTES,
    CALL_TIMEOUT_S,
    RETRY_BACKOFF_MS,
    Batches,
    FencedError,
    Outgoing,
    TransactionFailedError,
    Written,
    batched,
)

log = logging.getLogger(__name__)

TRANSACTION_TIMEOUT_MS = 60_000
ACKS_ALL = -1
NO_GENERATION = -1  # offsets committed for the group as a whole, as aiokafka's v0 does
NO_LEADER_EPOCH = -1
REQUIRED_TRANSACTION_VERSION = 2
NO_COMPRESSION = 0

UNKNOWN_TOPIC_OR_PARTITION = 3
LEADER_NOT_AVAILABLE = 5
NETWORK_EXCEPTION = 13
INVALID_PRODUCER_EPOCH = 47
PRODUCER_FENCED = 90
FENCING_CODES = frozenset({INVALID_PRODUCER_EPOCH, PRODUCER_FENCED})
# Unknown topic or partition, leader not available, not leader, network (a node gone), storage error,
# fenced or unknown leader epoch.
STALE_METADATA_CODES = frozenset({3, 5, 6, NETWORK_EXCEPTION, 56, 74, 75})
# Coordinator not available, not this node, network (a node gone).
COORDINATOR_MOVED_CODES = frozenset({15, 16, NETWORK_EXCEPTION})
# And request timed out, coordinator loading, replicas short (before or after the append), concurrent
# transactions (the previous transaction's markers are still being written).
RETRIABLE_CODES = STALE_METADATA_CODES | COORDINATOR_MOVED_CODES | frozenset({7, 14, 19, 20, 51})
MOST_BACKOFF_S = 0.5
Found = TypeVar("Found")


class BrokerRefusedError(RuntimeError):
    """A broker answered with an error code."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what}: error code {code}")
        self.code = code


class Kip890Transactions:
    def __init__(self, settings: ChoreoSettings, transactional_id: str) -> None:
        self.transactional_id = transactional_id
        self._client = AIOKafkaClient(**settings.kafka_options(), retry_backoff_ms=RETRY_BACKOFF_MS)
        self._producer_id = -1
        self._epoch = -1
        self._coordinator: int | None = None
        self._group_coordinators: dict[str, int] = {}
        self._tracked: set[str] = set()  # topics whose metadata the client keeps
        # (request, error code): how often a request was sent again
        self.retried: Counter[tuple[str, int]] = Counter()

    async def start(self) -> None:
        await self._client.bootstrap()
        await self._require_transaction_version()
        request = InitProducerIdRequestV0(self.transactional_id, TRANSACTION_TIMEOUT_MS)
        await self._take_epoch("InitProducerId", request, time.monotonic() + CALL_TIMEOUT_S)

    async def stop(self) -> None:
        await self._client.close()

    async def commit(
        self, records: Sequence[Outgoing], offsets: Mapping[TopicPartition, tuple[int, str]], group_id: str
    ) -> list[Written]:
        deadline = time.monotonic() + CALL_TIMEOUT_S
        try:
            batches, placements = await batched(records, self._partitions_of, self._new_batch)
            # Either failing cancels the other: nothing of a failed transaction goes on being sent.
            async with asyncio.TaskGroup() as requests:
                produced = requests.create_task(self._produce(batches, deadline))
                # A turn of the loop puts the records on the wire ahead of the offsets. The other way round,
                # a third of the offset commits met the leader adding its partition to the transaction and
                # were answered CONCURRENT_TRANSACTIONS, which only a record's leader retries on the broker.
                await asyncio.sleep(0)
                requests.create_task(self._commit_offsets(offsets, group_id, deadline))
            await self._end(deadline)
        except ExceptionGroup as failures:
            cause = next((error for error in failures.exceptions if _is_fence(error)), failures.exceptions[0])
            raise _meaning(cause) from failures
        except (BrokerRefusedError, KafkaError, OSError, TimeoutError) as error:
            raise _meaning(error) from error
        base_offsets = produced.result()
        # A record's offset is its batch's base offset plus its place in the batch.
        return [
            Written(batches[n][0].topic, batches[n][0].partition, base_offsets[n] + place) for n, place in placements
        ]

    # --- the three requests -------------------------------------------------------------------

    async def _produce(self, batches: Batches, deadline: float) -> list[int]:
        """Write every batch, each with the next sequences of its partition; each batch's base offset."""
        sequences: dict[TopicPartition, int] = {}
        encoded: list[bytes] = []
        for tp, batch in batches:
            sequence = sequences.get(tp, 0)
            batch._set_producer_state(self._producer_id, self._epoch, sequence)
            sequences[tp] = sequence + batch.record_count()
            encoded.append(batch._build())
        base_offsets = [-1] * len(batches)
        # One batch of a partition in flight at a time keeps a retried one ahead of those after it.
        waiting = list(range(len(batches)))
        for attempt in itertools.count():
            if not waiting:
                return base_offsets
            by_leader: dict[int, list[int]] = {}
            taken: set[TopicPartition] = set()
            for n in waiting:
                tp = batches[n][0]
                if tp not in taken:
                    taken.add(tp)
                    by_leader.setdefault(await self._leader(tp, deadline), []).append(n)
            answers = await asyncio.gather(
                *(self._produce_on(leader, numbers, batches, encoded) for leader, numbers in by_leader.items())
            )
            refused = 0
            for numbers, codes in zip(by_leader.values(), answers, strict=True):
                for n, (code, base_offset) in zip(numbers, codes, strict=True):
                    if code == 0:
                        base_offsets[n] = base_offset
                        waiting.remove(n)
                    else:
                        refused = code
            if refused:
                await self._before_retry("Produce", refused, deadline, attempt)
        raise AssertionError("unreachable")

    async def _produce_on(
        self, leader: int, numbers: list[int], batches: Batches, encoded: list[bytes]
    ) -> list[tuple[int, int]]:
        topics: dict[str, list[tuple[int, bytes, dict[int, bytes]]]] = {}
        for n in numbers:
            tp = batches[n][0]
            topics.setdefault(tp.topic, []).append((tp.partition, encoded[n], NO_TAGS))
        request = ProduceRequestV12(
            self.transactional_id,
            ACKS_ALL,
            int(CALL_TIMEOUT_S * 1000),
            [(topic, partitions, NO_TAGS) for topic, partitions in topics.items()],
            NO_TAGS,
        )
        answer = await self._ask(leader, request)
        if answer is None:
            return [(NETWORK_EXCEPTION, -1)] * len(numbers)
        found = {
            (topic, partition[0]): (partition[1], partition[2])
            for topic, partitions, _ in answer.topics
            for partition in partitions
        }
        return [found.get((batches[n][0].topic, batches[n][0].partition), (NETWORK_EXCEPTION, -1)) for n in numbers]

    async def _commit_offsets(
        self, offsets: Mapping[TopicPartition, tuple[int, str]], group_id: str, deadline: float
    ) -> None:
        if not offsets:
            return
        topics: dict[str, list[tuple[int, int, int, str, dict[int, bytes]]]] = {}
        for tp, (offset, metadata) in offsets.items():
            topics.setdefault(tp.topic, []).append((tp.partition, offset, NO_LEADER_EPOCH, metadata, NO_TAGS))
        for attempt in itertools.count():
            coordinator = await self._group_coordinator(group_id, deadline)
            request = TxnOffsetCommitRequestV5(
                self.transactional_id,
                group_id,
                self._producer_id,
                self._epoch,
                NO_GENERATION,
                "",
                None,
                [(topic, partitions, NO_TAGS) for topic, partitions in topics.items()],
                NO_TAGS,
            )
            answer = await self._ask(coordinator, request)
            codes = (
                [code for _, partitions, _ in answer.topics for _, code, _ in partitions if code != 0]
                if answer is not None
                else [NETWORK_EXCEPTION]
            )
            if not codes:
                return
            await self._before_retry("TxnOffsetCommit", codes[0], deadline, attempt)

    async def _end(self, deadline: float) -> None:
        """Commit; the answer carries the producer id and epoch of the next transaction."""
        # Sent again after a lost answer, it is answered as the first was (KIP-890 makes EndTxn retriable).
        request = EndTxnRequestV5(self.transactional_id, self._producer_id, self._epoch, True, NO_TAGS)
        await self._take_epoch("EndTxn", request, deadline)

    async def _take_epoch(self, what: str, request: RequestStruct, deadline: float) -> None:
        """Send `request` to the transaction coordinator until it is answered without an error, and use the
        producer id and epoch the answer names (InitProducerId's and EndTxn's both do)."""
        for attempt in itertools.count():
            answer = await self._ask(await self._transaction_coordinator(deadline), request)
            if answer is not None and answer.error_code == 0:
                self._producer_id, self._epoch = answer.producer_id, answer.producer_epoch
                return
            await self._before_retry(what, _code(answer), deadline, attempt)

    # --- metadata, coordinators, retries ------------------------------------------------------

    async def finalized_features(self) -> dict[str, int]:
        """The features the cluster has finalized, with their levels (ApiVersions v3)."""
        request = ApiVersionsRequestV3("choreo", "1", NO_TAGS)
        return finalized_features(await self._client.send(self._client.get_random_node(), Exactly(request)))

    async def _require_transaction_version(self) -> None:
        level = (await self.finalized_features()).get("transaction.version", 0)
        if level < REQUIRED_TRANSACTION_VERSION:
            raise RuntimeError(
                f"the cluster finalizes transaction.version {level}; CHOREO_TRANSACTION_CLIENT=kip890 needs "
                f"{REQUIRED_TRANSACTION_VERSION} (Kafka 4.0 or later): set CHOREO_TRANSACTION_CLIENT=aiokafka, "
                "or upgrade the feature with kafka-features.sh"
            )

    async def _transaction_coordinator(self, deadline: float) -> int:
        if self._coordinator is None:
            self._coordinator = await self._lookup(CoordinationType.TRANSACTION, self.transactional_id, deadline)
        return self._coordinator

    async def _group_coordinator(self, group_id: str, deadline: float) -> int:
        coordinator = self._group_coordinators.get(group_id)
        if coordinator is None:
            coordinator = self._group_coordinators[group_id] = await self._lookup(
                CoordinationType.GROUP, group_id, deadline
            )
        return coordinator

    async def _lookup(self, kind: int, key: str, deadline: float) -> int:
        """The coordinator of `key`; a cluster still electing one (or creating its topic) is asked again."""
        while True:
            try:
                return int(await self._client.coordinator_lookup(kind, key))
            except KafkaError as error:
                if not error.retriable or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(RETRY_BACKOFF_MS / 1000)

    async def _partitions_of(self, topic: str) -> list[int]:
        def known() -> list[int] | None:
            return sorted(self._client.cluster.partitions_for_topic(topic) or ()) or None

        deadline = time.monotonic() + CALL_TIMEOUT_S
        return await self._from_metadata(topic, known, f"partitions of {topic}", UNKNOWN_TOPIC_OR_PARTITION, deadline)

    async def _leader(self, tp: TopicPartition, deadline: float) -> int:
        def known() -> int | None:
            leader = self._client.cluster.leader_for_partition(tp)
            return int(leader) if leader is not None and leader >= 0 else None

        return await self._from_metadata(tp.topic, known, f"leader of {tp}", LEADER_NOT_AVAILABLE, deadline)

    async def _from_metadata(
        self, topic: str, known: Callable[[], Found | None], what: str, code: int, deadline: float
    ) -> Found:
        """What `known` finds in the client's metadata of `topic`: at once, after fetching the topic's metadata
        if the client did not keep it yet, or after waiting and refreshing as for error `code`."""
        for attempt in itertools.count():
            found = known()
            if found is not None:
                return found
            if not await self._tracked_now(topic):
                await self._before_retry(what, code, deadline, attempt)
        raise AssertionError("unreachable")

    async def _tracked_now(self, topic: str) -> bool:
        """Whether `topic` was new to the client's metadata; if so, it is kept from now on and fetched now."""
        if topic in self._tracked:
            return False
        self._tracked.add(topic)
        await self._client.add_topic(topic)
        return True

    async def _ask(self, node: int, request: RequestStruct) -> Any | None:
        """`node`'s answer to `request`, or None if the connection failed in a way time may mend."""
        try:
            return await self._client.send(node, Exactly(request))
        except KafkaError as error:
            if not error.retriable:
                raise
            return None

    async def _before_retry(self, what: str, code: int, deadline: float, attempt: int) -> None:
        """Wait to send `what` again after error `code`, with what it needs refreshed; raise if it may not."""
        if code not in RETRIABLE_CODES or time.monotonic() >= deadline:
            raise BrokerRefusedError(what, code)
        self.retried[(what, code)] += 1
        log.debug("%s was answered with error code %d; sending it again", what, code)
        if code in STALE_METADATA_CODES:
            await self._client.force_metadata_update()
        if code in COORDINATOR_MOVED_CODES:
            self._coordinator = None
            self._group_coordinators.clear()
        await asyncio.sleep(min(RETRY_BACKOFF_MS / 1000 * 2**attempt, MOST_BACKOFF_S))

    def _new_batch(self) -> BatchBuilder:
        return BatchBuilder(BATCH_BYTES, NO_COMPRESSION, is_transactional=1)


def _is_fence(error: BaseException) -> bool:
    return isinstance(error, BrokerRefusedError) and error.code in FENCING_CODES


def _meaning(error: BaseException) -> Exception:
    """The runner's error for a failed transaction's `error`."""
    if _is_fence(error):
        return FencedError(str(error))
    if isinstance(error, (BrokerRefusedError, KafkaError, OSError, TimeoutError)):
        return TransactionFailedError(repr(error))
    raise error


def _code(answer: Any | None) -> int:
    return NETWORK_EXCEPTION if answer is None else int(answer.error_code)

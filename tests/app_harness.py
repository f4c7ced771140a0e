"""Runs a service's StreamApp without a broker: every task with an in-memory store, each feed or tick
one committed batch, the changelog kept so a restart restores state as the runner does."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from schemas.deadletter import DeadLetter
from schemas.envelope import Envelope
from schemas.topics import DEAD_LETTER, Topic
from services.common.kafka import partition_for
from services.common.processor import Incoming, StreamApp, TaskContext
from services.common.settings import ChoreoSettings
from services.common.state import KeyedStore

App = TypeVar("App", bound=StreamApp)
Settings = TypeVar("Settings", bound=ChoreoSettings)


@dataclass(frozen=True)
class Out:
    """One record the app produced: a contract event, or a dead letter."""

    topic: str
    key: str | None
    envelope: Envelope | None
    dead_letter: DeadLetter | None
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None
    """Set when the app chose the partition; else the key's (murmur2) decides."""
    value: bytes | None = None


class AppHarness(Generic[App, Settings]):
    def __init__(self, settings: Settings, build: Callable[[Settings], App]) -> None:
        self.settings = settings
        self._build = build
        self.app: App = build(settings)
        self.stores = {p: KeyedStore() for p in range(settings.partitions)}
        self.changelog: dict[int, list[tuple[str, bytes | None]]] = {p: [] for p in self.stores}
        self._offsets = itertools.count()

    def partition(self, order_id: str) -> int:
        return partition_for(order_id.encode(), self.settings.partitions)

    def feed(self, topic: Topic, envelope: Envelope) -> list[Out]:
        """`envelope` as a record on `topic`, with the headers every producer gives it."""
        partition = self.partition(envelope.order_id)
        return self.feed_raw(topic, envelope.key, envelope.to_bytes(), partition, headers=envelope.headers())

    def feed_raw(
        self,
        topic: Topic,
        key: bytes | None,
        value: bytes | None,
        partition: int,
        headers: tuple[tuple[str, bytes], ...] = (),
    ) -> list[Out]:
        message = Incoming(topic, partition, next(self._offsets), key, value, 0, headers)
        return self._run(partition, lambda task: self.app.process(task, message))

    def tick(self, now: datetime) -> list[Out]:
        return [out for p in self.stores for out in self._run(p, lambda task: self.app.tick(task, now))]

    def restart(self) -> None:
        """A new instance of the app, its stores restored from the changelog."""
        self.app = self._build(self.settings)
        self.stores = {p: KeyedStore() for p in self.stores}
        for p, records in self.changelog.items():
            for key, value in records:
                self.stores[p].restore(key, value)

    def _run(self, partition: int, work: Callable[[TaskContext], None]) -> list[Out]:
        store = self.stores[partition]
        task = TaskContext(partition, self.settings, self.app.name, store)
        work(task)
        self.changelog[partition].extend(store.pending_changes().items())
        store.commit()
        for callback in task.tally.callbacks:  # as the runner does once the transaction committed
            callback()
        outs = []
        for out in task.outbox:
            assert out.value is not None
            key = out.key.decode() if out.key is not None else None
            if out.topic == self.settings.topic(DEAD_LETTER):
                outs.append(Out(out.topic, key, None, DeadLetter.model_validate_json(out.value), out.headers))
            else:
                envelope = Envelope.from_bytes(out.value)
                outs.append(Out(out.topic, key, envelope, None, out.headers, out.partition, out.value))
        return outs

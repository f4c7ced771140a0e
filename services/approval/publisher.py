"""Publishing reviewers' decisions to `approval.decisions`, where the stream side rules on them."""

from __future__ import annotations

from typing import Protocol

from aiokafka import AIOKafkaProducer

from schemas.envelope import Envelope
from schemas.topics import APPROVAL_DECISIONS
from services.common.kafka import producer as make_producer
from services.common.settings import ChoreoSettings
from services.common.tracing import current_trace_headers, with_trace


class PublishError(RuntimeError):
    """The decision could not be handed to Kafka; the client may retry."""


class DecisionPublisher(Protocol):
    async def publish(self, envelope: Envelope) -> None:
        """Return once the broker has acknowledged the decision; raise PublishError otherwise. The record
        carries the trace context of the current span (the HTTP decision's)."""


class KafkaDecisionPublisher:
    """One idempotent producer for the process; decisions are keyed by order, as the stream side requires."""

    def __init__(self, settings: ChoreoSettings, *, timeout_ms: int = 10_000) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer = make_producer(settings, request_timeout_ms=timeout_ms)
        self._started = False

    @property
    def ready(self) -> bool:
        return self._started

    async def start(self) -> None:
        await self._producer.start()
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._producer.stop()

    async def publish(self, envelope: Envelope) -> None:
        if not self._started:
            raise PublishError("the decision publisher is not running")
        try:
            await self._producer.send_and_wait(
                self.settings.topic(APPROVAL_DECISIONS),
                envelope.to_bytes(),
                key=envelope.key,
                headers=list(with_trace(envelope.headers(), current_trace_headers())),
            )
        except Exception as error:  # any failure to hand over is the client's to retry, never a 500
            raise PublishError(f"could not publish the decision: {error!r}") from error

"""Publishes envelopes on the topic the registry assigns to their type, each starting a trace."""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka.structs import RecordMetadata
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from schemas.envelope import Envelope
from schemas.topics import topic_of
from services.common.kafka import producer
from services.common.settings import ChoreoSettings
from services.common.tracing import ORDER_ID_ATTRIBUTE, TRACER_NAME, trace_headers, with_trace


async def publish(
    settings: ChoreoSettings, envelopes: Sequence[Envelope], *, tracer_provider: trace.TracerProvider | None = None
) -> list[RecordMetadata]:
    """Send every envelope, keyed by its order, and wait until the broker has acknowledged all of them.

    Each record is sent in a PRODUCER span of its own, the root of a new trace, and carries its traceparent:
    the services' spans for the saga nest under it.
    """
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    tracer = provider.get_tracer(TRACER_NAME)
    client = producer(settings)
    await client.start()
    spans: list[trace.Span] = []
    try:
        pending = []
        for envelope in envelopes:
            topic = topic_of(type(envelope.data))
            name = settings.topic(topic)
            span = tracer.start_span(f"publish {topic.name}", context=Context(), kind=SpanKind.PRODUCER)
            spans.append(span)
            if span.is_recording():
                span.set_attributes(
                    {
                        "messaging.system": "kafka",
                        "messaging.operation.type": "send",
                        "messaging.destination.name": name,
                        ORDER_ID_ATTRIBUTE: envelope.order_id,
                    }
                )
            headers = with_trace(envelope.headers(), trace_headers(span))
            pending.append(await client.send(name, envelope.to_bytes(), key=envelope.key, headers=list(headers)))
        delivered: list[RecordMetadata] = []
        for span, delivery in zip(spans, pending, strict=True):
            try:
                metadata = await delivery
            except Exception as error:
                span.set_status(Status(StatusCode.ERROR, repr(error)))
                raise
            if span.is_recording():
                span.set_attribute("messaging.destination.partition.id", str(metadata.partition))
                span.set_attribute("messaging.kafka.offset", metadata.offset)
            delivered.append(metadata)
        return delivered
    finally:
        for span in spans:
            span.end()
        await client.stop()

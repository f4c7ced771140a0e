"""Publishes envelopes on the topic the registry assigns to their type."""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka.structs import RecordMetadata

from schemas.envelope import Envelope
from schemas.topics import topic_of
from services.common.kafka import producer
from services.common.settings import ChoreoSettings


async def publish(settings: ChoreoSettings, envelopes: Sequence[Envelope]) -> list[RecordMetadata]:
    """Send every envelope, keyed by its order, and wait until the broker has acknowledged all of them."""
    client = producer(settings)
    await client.start()
    try:
        pending = [
            await client.send(
                settings.topic(topic_of(type(envelope.data))),
                envelope.to_bytes(),
                key=envelope.key,
                headers=list(envelope.headers()),
            )
            for envelope in envelopes
        ]
        return [await delivery for delivery in pending]
    finally:
        await client.stop()

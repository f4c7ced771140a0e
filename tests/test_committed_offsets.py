"""Reading a group's committed offsets on the real broker while a transaction still commits some of them."""

from __future__ import annotations

import gc
import logging

import pytest
from aiokafka import TopicPartition
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from schemas.topics import ORDERS
from services.common.kafka import confluent_options, offsets_settled
from services.common.kafka import producer as make_producer
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from tests.support import committed_offsets


async def test_offsets_a_transaction_still_commits_settle_only_once_it_has(choreo_settings: ChoreoSettings) -> None:
    # Given a transaction that carries offsets for a group, taken by the coordinator but not committed
    settings = choreo_settings
    await ensure_topics(settings)
    tp = TopicPartition(settings.topic(ORDERS), 0)
    group = settings.group("stable-probe")
    producer = make_producer(settings, transactional_id=f"{settings.topic_prefix}stable-probe")
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: 5}, group)
        # When the offsets are read while it is open
        # Then a plain read shows the offsets from before it (none), where a resuming owner would redo it
        assert (await committed_offsets(settings, group, [tp]))[tp] == -1
        # And they are not settled while it is open
        with pytest.raises(KafkaException):
            await offsets_settled(settings, group, [tp], timeout_s=1.0)
        # And once it commits they settle, on its offset
        await producer.commit_transaction()
        await offsets_settled(settings, group, [tp])
        assert (await committed_offsets(settings, group, [tp]))[tp] == 5
    finally:
        await producer.stop()


def test_librdkafka_lines_are_log_records_never_raw_on_stderr(
    choreo_settings: ChoreoSettings, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    # Given an admin client built from the shared options, made to say a lot
    caplog.set_level(logging.DEBUG, logger="librdkafka")
    admin = AdminClient({**confluent_options(choreo_settings), "debug": "generic,broker"})
    # When it works, is served and ends (librdkafka writes some lines at its end)
    admin.list_topics(timeout=10)
    admin.poll(0)
    del admin
    gc.collect()
    # Then its lines were records of the librdkafka logger, and none reached stderr raw
    assert any(record.name == "librdkafka" for record in caplog.records)
    assert "rdkafka" not in capfd.readouterr().err

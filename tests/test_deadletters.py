"""Dead letters without a broker: the headers a service gives one, and what a replay decides."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from schemas.deadletter import (
    DLT_CONSUMER,
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
from schemas.envelope import CE_TYPE
from schemas.topics import ORDERS
from services.cli.deadletter_cmd import parse_moment
from services.common.deadletters import (
    Header,
    LetterId,
    StoredDeadLetter,
    dead_letter_headers,
    plan_replays,
    rfc3339_ms,
    truncated,
)
from services.common.kafka import partition_for
from services.inventory.app import InventoryApp, build_app
from services.inventory.settings import InventorySettings
from tests.app_harness import AppHarness

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def inventory() -> AppHarness[InventoryApp, InventorySettings]:
    return AppHarness(InventorySettings(_env_file=None, topic_prefix="p."), build_app)


def test_a_dead_letter_carries_its_origin_and_the_original_headers() -> None:
    # Given an order that is not JSON, replayed once already, with a stale dead-letter header of its own
    harness = inventory()
    partition = harness.partition("o-1")
    original: tuple[tuple[str, bytes], ...] = (
        (CE_TYPE, b"OrderPlaced"),
        (REPLAY_COUNT, b"1"),
        (DLT_REASON, b"an earlier rejection"),
    )
    # When inventory reads it
    [out] = harness.feed_raw(ORDERS, b"o-1", b"{not json", partition, original)
    # Then its dead letter repeats the origin of its value in headers, after the original's own
    letter = out.dead_letter
    assert letter is not None
    assert out.topic == "p.deadletter"
    headers = dict(out.headers)
    assert headers[DLT_ORIGINAL_TOPIC] == b"p.orders" == letter.topic.encode()
    assert headers[DLT_ORIGINAL_PARTITION] == str(partition).encode()
    assert headers[DLT_ORIGINAL_OFFSET] == str(letter.offset).encode()
    assert headers[DLT_ORIGINAL_TIMESTAMP] == b"0"
    assert headers[DLT_CONSUMER] == b"inventory"
    assert headers[DLT_REASON].decode().startswith("not JSON")
    assert headers[DLT_REASON] == letter.reason.encode()
    assert headers[DLT_TIME] == rfc3339_ms(letter.dead_lettered_at).encode()
    assert headers[DLT_TIME].endswith(b"Z")
    # And the original's headers come first, its replay count kept; its stale dead-letter header is not copied
    assert out.headers[:2] == ((CE_TYPE, b"OrderPlaced"), (REPLAY_COUNT, b"1"))
    assert [name for name, _value in out.headers].count(DLT_REASON) == 1


def test_the_reason_header_is_cut_on_a_character_boundary() -> None:
    reason = "data.items: " + "é" * 1000
    letter = DeadLetter(
        reason=reason,
        topic="orders",
        partition=0,
        offset=1,
        key_base64=None,
        value_base64=None,
        consumer="inventory",
        dead_lettered_at=NOW,
    )
    header = dict(dead_letter_headers(letter, (), 0))[DLT_REASON]
    assert len(header) <= DLT_REASON_MAX_BYTES
    assert header.decode().endswith("…")
    assert reason.startswith(header.decode().removesuffix("…"))
    assert truncated("short", DLT_REASON_MAX_BYTES) == b"short"


FIRST_ID = LetterId(0, 1)


def stored(
    *,
    key: bytes | None = b"o-1",
    headers: tuple[Header, ...] = (),
    topic: str = "p.orders",
    partition: int = 4,
    offset: int = 9,
    consumer: str = "inventory",
    letter_id: LetterId = FIRST_ID,
) -> StoredDeadLetter:
    letter = DeadLetter(
        reason="not JSON",
        topic=topic,
        partition=partition,
        offset=offset,
        key_base64=base64.b64encode(key).decode() if key is not None else None,
        value_base64=base64.b64encode(b"{not json").decode(),
        consumer=consumer,
        dead_lettered_at=NOW,
    )
    return StoredDeadLetter(letter_id, letter, (*headers, (DLT_REASON, b"not JSON")))


def test_a_replay_keeps_the_original_headers_and_counts_one_more() -> None:
    letter = stored(headers=((CE_TYPE, b"OrderPlaced"), (REPLAY_COUNT, b"2"), ("x-null", None)))
    [replay] = plan_replays([letter], max_replays=3, partitions={"p.orders": 6})
    assert replay.outcome == "send"
    assert replay.headers == ((CE_TYPE, b"OrderPlaced"), ("x-null", None), (REPLAY_COUNT, b"3"))
    # Where the key belongs (murmur2), whatever partition the original sat on
    assert replay.partition == partition_for(b"o-1", 6)


def test_a_record_without_a_key_goes_back_to_its_partition() -> None:
    [replay] = plan_replays([stored(key=None, partition=4)], max_replays=3, partitions={"p.orders": 6})
    assert (replay.outcome, replay.partition) == ("send", 4)


@pytest.mark.parametrize(
    ("count", "outcome"), [(None, "send"), (b"2", "send"), (b"3", "refuse"), (b"7", "refuse"), (b"many", "refuse")]
)
def test_the_replay_limit_refuses_a_message_replayed_too_often(count: bytes | None, outcome: str) -> None:
    headers: tuple[Header, ...] = ((REPLAY_COUNT, count),) if count is not None else ()
    [replay] = plan_replays([stored(headers=headers)], max_replays=3, partitions={"p.orders": 6})
    assert replay.outcome == outcome
    if outcome == "refuse":
        assert REPLAY_COUNT in replay.detail or "limit 3" in replay.detail


def test_a_record_every_consumer_dead_lettered_goes_back_once() -> None:
    # Given the same record dead-lettered by inventory and audit, and another one by inventory
    letters = [
        stored(consumer="inventory", letter_id=LetterId(0, 1)),
        stored(consumer="audit", letter_id=LetterId(2, 5)),
        stored(offset=10, letter_id=LetterId(0, 2)),
    ]
    replays = plan_replays(letters, max_replays=3, partitions={"p.orders": 6})
    # Then each record is sent once; the second dead letter of the first is skipped as the same record
    assert [replay.outcome for replay in replays] == ["send", "skip", "send"]
    assert replays[1].same_as == LetterId(0, 1)
    assert "the same record as 0:1" in replays[1].detail


def test_requests_handed_over_in_process_are_never_taken_for_the_same_record() -> None:
    letters = [stored(offset=-1, letter_id=LetterId(0, 1)), stored(offset=-1, letter_id=LetterId(0, 2))]
    replays = plan_replays(letters, max_replays=3, partitions={"p.orders": 6})
    assert [replay.outcome for replay in replays] == ["send", "send"]


def test_a_dead_letter_whose_topic_is_gone_is_skipped() -> None:
    [replay] = plan_replays([stored(topic="p.gone")], max_replays=3, partitions={"p.orders": 6})
    assert replay.outcome == "skip"
    assert "p.gone does not exist" in replay.detail


def test_times_are_iso_or_a_time_ago() -> None:
    assert parse_moment("2h", NOW) == NOW - timedelta(hours=2)
    assert parse_moment("30m", NOW) == NOW - timedelta(minutes=30)
    assert parse_moment("1.5d", NOW) == NOW - timedelta(days=1.5)
    assert parse_moment("2030-01-01T10:00:00", NOW) == datetime(2030, 1, 1, 10, tzinfo=UTC)
    assert parse_moment("2030-01-01T10:00:00+02:00", NOW) == datetime(2030, 1, 1, 8, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither an ISO 8601 time"):
        parse_moment("yesterday", NOW)


def test_letter_ids_are_partition_and_offset() -> None:
    assert LetterId.parse("3:17") == LetterId(3, 17)
    assert str(LetterId(3, 17)) == "3:17"
    for text in ("3", "3:", "a:1", "-1:2"):
        with pytest.raises(ValueError, match="PARTITION:OFFSET"):
            LetterId.parse(text)

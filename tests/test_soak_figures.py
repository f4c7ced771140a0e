"""The soak benchmark's arithmetic, without a broker: live keys, disk per topic, start and end figures."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.broker_figures import LiveKeys, key_kind, topic_disk_usage
from benchmarks.soak import edges, find_number, restart_points
from services.common.settings import ChoreoSettings


def record(key: bytes, value: bytes | None) -> SimpleNamespace:
    return SimpleNamespace(key=key, value=value)


def test_live_keys_keep_the_last_value_per_key_and_forget_deleted_ones() -> None:
    keys = LiveKeys(ChoreoSettings(environment="test"), ["t.inventory.state"])
    topic = keys.topics["t.inventory.state"]
    LiveKeys._take(topic, [record(b"order:o-1", b"{}"), record(b"order:o-2", b"{}"), record(b"sku:A", b"{}")])
    LiveKeys._take(topic, [record(b"order:o-1", b'{"v": 2}'), record(b"order:o-2", None), record(b"order:o-3", None)])

    assert keys.count("t.inventory.state") == 2
    assert topic.live == {b"order:o-1", b"sku:A"}
    assert dict(topic.kinds) == {"order": 1, "sku": 1}
    assert topic.records == 6


def test_key_kind_is_the_part_before_the_colon() -> None:
    assert key_kind(b"customer:c-1") == "customer"
    assert key_kind(b"plain") == "(no prefix)"


def test_disk_usage_sums_each_topics_partition_folders_and_skips_others(tmp_path: Path) -> None:
    for folder, files in {
        "p.orders-0": {"00000000000000000000.log": 1000, "00000000000000000000.index": 0},
        "p.orders-1": {"00000000000000000000.log": 500},
        "p.inventory.state-0": {"00000000000000000000.log": 200},
        "p.orders-2.0a1b-delete": {"00000000000000000000.log": 9999},
        "q.orders-0": {"00000000000000000000.log": 9999},
    }.items():
        (tmp_path / folder).mkdir()
        for name, size in files.items():
            (tmp_path / folder / name).write_bytes(b"x" * size)

    usage = topic_disk_usage(tmp_path, "p.")

    assert set(usage) == {"orders", "inventory.state"}
    assert usage["orders"].segment_bytes == 1500
    assert usage["orders"].disk_bytes >= 1500
    assert usage["inventory.state"].segment_bytes == 200
    assert topic_disk_usage(tmp_path / "absent", "p.") == {}


def test_edges_are_medians_of_the_first_and_last_tenth() -> None:
    values = [10.0] * 5 + [50.0] * 10 + [20.0] * 5  # 20 samples: two at each edge
    assert edges(values) == (10.0, 20.0)
    assert edges([7.0]) == (7.0, 7.0)


def test_restore_figures_are_found_wherever_the_health_body_nests_them() -> None:
    body = {"status": "ok", "checks": {"stream": {"restored_records": 120, "restore_seconds": 0.5}}}
    assert find_number(body, "restored_records") == 120
    assert find_number(body, "restore_seconds") == 0.5
    assert find_number({"restored_records": True}, "restored_records") is None
    assert find_number(None, "restore_seconds") is None


def test_restart_points_parse_sorted_and_empty() -> None:
    assert restart_points("100000,10000") == [10000, 100000]
    assert restart_points("") == []
    with pytest.raises(argparse.ArgumentTypeError):
        restart_points("10k")

"""The soak benchmark's arithmetic, without a broker: live keys, disk per topic, start and end figures."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.broker_figures import LiveKeys, key_kind, topic_disk_usage
from benchmarks.soak import (
    Report,
    RestartFigures,
    Sample,
    caches_filled_at,
    edges,
    find_number,
    restart_points,
    rss_figures,
)
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


def sample(at_s: float, rss: float, rocks: float | None = None, limit: float = 32.0) -> Sample:
    cache = {} if rocks is None else {"inventory": rocks}
    limits = {} if rocks is None else {"inventory": limit}
    return Sample(at_s, 0, 0, 0, 0, {"inventory": rss}, {}, {}, rocks_mb=cache, rocks_limit_mb=limits)


def soak_report(samples: list[Sample], warmup_s: float = 0.0) -> Report:
    report = Report("b", True, 6, {}, {}, 60.0, "disk", warmup_s=warmup_s, steady_s=samples[-1].at_s)
    report.samples = samples
    return report


def test_the_warm_up_lasts_until_every_rocksdb_cache_is_nearly_full() -> None:
    report = soak_report([sample(t, 80, rocks=t / 10) for t in range(0, 400, 10)])
    assert caches_filled_at(report, earliest_s=120, latest_s=1000) == 290  # 29 MB >= 90 % of 32
    assert caches_filled_at(report, earliest_s=350, latest_s=1000) == 350
    assert caches_filled_at(report, earliest_s=120, latest_s=200) == 200  # never before the cap


def test_rss_figures_set_the_rocksdb_cache_apart() -> None:
    # A service whose cache fills from 10 to 30 MB while everything else stays at 50 MB
    samples = [sample(t, 60 + 20 * t / 190, rocks=10 + 20 * t / 190) for t in range(0, 200, 10)]
    (figures,) = rss_figures(soak_report(samples), {})
    start, end = 60 + 20 * 5 / 190, 60 + 20 * 185 / 190  # medians of the first and the last two samples
    assert figures.change_pct == pytest.approx(100 * (end - start) / start)
    assert figures.rocks_start_mb == pytest.approx(start - 50)
    assert figures.rest_change_pct == pytest.approx(0.0, abs=0.01)
    assert figures.span == "the whole steady phase"


def test_a_restarted_service_is_measured_over_its_longest_running_process() -> None:
    before = [sample(t, 100) for t in range(0, 300, 10)]
    after = [sample(t, 60) for t in range(300, 400, 10)]
    report = soak_report(before + after)
    report.restarts = [RestartFigures("inventory", 1, 1, 295.0, 1.0, 1.0, None, None, None)]
    (figures,) = rss_figures(report, {"inventory": 1})
    assert (figures.start_mb, figures.end_mb) == (100, 100)
    assert figures.span == "process 1 of 2, 0-290 s"
    assert figures.rocks_start_mb is None

"""`choreo audit` and `choreo status` argument parsing (reading the topic needs a broker)."""

from __future__ import annotations

import argparse

import pytest

from services.cli.audit_cmd import add_audit_commands


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="choreo")
    add_audit_commands(root.add_subparsers(dest="command", required=True))
    return root


def test_audit_options_combine() -> None:
    args = parser().parse_args(["audit", "--order", "o-1", "--follow", "--json"])
    assert (args.order, args.follow, args.json, args.limit) == ("o-1", True, True, None)
    assert callable(args.handler)


def test_audit_without_options_reads_every_order() -> None:
    args = parser().parse_args(["audit", "--limit", "3"])
    assert (args.order, args.follow, args.json, args.limit) == (None, False, False, 3)


@pytest.mark.parametrize("limit", ["0", "-2", "many"])
def test_limit_must_be_a_positive_count(limit: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["audit", "--limit", limit])
    assert "--limit" in capsys.readouterr().err


def test_status_takes_an_order_id() -> None:
    args = parser().parse_args(["status", "o-9"])
    assert args.order_id == "o-9"
    with pytest.raises(SystemExit):
        parser().parse_args(["status"])

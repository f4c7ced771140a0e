"""The bench profile's summary: each sample counted once, under the innermost kind of work it recognises."""

from __future__ import annotations

import math

from benchmarks.profile import OTHER, kind_of, render, summarize

LOOP = "run (asyncio/runners.py:118);_run_once (asyncio/base_events.py:1922)"
RUNNER = f"{LOOP};_process (services/common/processor.py:310)"
DECODE = ";".join(
    (RUNNER, "process (services/audit/app.py:3)", "from_bytes (schemas/envelope.py:1)", "validate (pydantic/main.py:9)")
)
SOCKET = f"{RUNNER};send (aiokafka/conn.py:470);_SelectorSocketTransport.write (asyncio/selector_events.py:1075)"


def test_a_sample_takes_the_kind_of_its_innermost_recognised_frame() -> None:
    assert kind_of(DECODE.split(";")) == "JSON and validation"
    assert kind_of(SOCKET.split(";")) == "socket writes"
    assert kind_of(RUNNER.split(";")) == "runner"
    assert kind_of(["main (somewhere.py:1)"]) == OTHER


def test_shares_add_up_and_the_top_functions_drop_paths_and_lines() -> None:
    collapsed = f"{DECODE} 6\n{SOCKET} 3\n{RUNNER} 1\n\nnot a profile line\n"

    summary = summarize(collapsed)

    assert summary.samples == 10
    assert math.isclose(sum(summary.kinds.values()), 1.0)
    assert summary.kinds["JSON and validation"] == 0.6
    assert summary.top_self[0] == ("validate (pydantic/main.py)", 0.6)
    table = render({"audit": summary})
    assert any(line.split()[-1:] == ["60.0%"] and "JSON" in line for line in table)


def test_an_empty_profile_has_no_samples() -> None:
    assert summarize("").samples == 0

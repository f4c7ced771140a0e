"""Whatever order and however often one order's events arrive, the audit writes each once, after its cause."""

from __future__ import annotations

import itertools
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.envelope import Envelope
from tests.audit.builders import (
    SCENARIOS,
    WAIT,
    Harness,
    completed_saga,
    interleave,
    refused_cancellation,
    topic_name,
)


def _all_sagas() -> list[list[Envelope]]:
    sagas = [build() for build in SCENARIOS.values()]
    happy = completed_saga("o-refused")
    return [*sagas, happy + refused_cancellation(happy)]


SAGAS = _all_sagas()


@st.composite
def deliveries(draw: st.DrawFn, saga: list[Envelope]) -> list[list[Envelope]]:
    """The saga's topics interleaved in any way (each topic in its own order), some events re-sent
    later on their topic, cut into batches."""
    arrivals = interleave(saga, draw(st.permutations([topic_name(event) for event in saga])))
    repeats = draw(st.lists(st.sampled_from(saga), max_size=len(saga)))
    for event in repeats:
        first = arrivals.index(event)
        arrivals.insert(draw(st.integers(first + 1, len(arrivals))), event)
    cuts = sorted(draw(st.sets(st.integers(1, len(arrivals) - 1), max_size=4))) if len(arrivals) > 1 else []
    bounds = [0, *cuts, len(arrivals)]
    return [arrivals[start:end] for start, end in itertools.pairwise(bounds)]


def assert_once_and_causal(written: list[Envelope], expected: list[Envelope]) -> None:
    written_ids = [event.event_id for event in written]
    assert sorted(map(str, written_ids)) == sorted(str(event.event_id) for event in expected), "each event once"
    position = {event_id: index for index, event_id in enumerate(written_ids)}
    for event in written:
        if event.causation_id in position:
            assert position[event.causation_id] < position[event.event_id], f"{event.type} before its cause"


@settings(max_examples=300, deadline=None)
@given(data=st.data(), which=st.sampled_from(range(len(SAGAS))))
def test_any_arrival_order_and_duplication_writes_each_event_once_after_cause(data: st.DataObject, which: int) -> None:
    # Given one order's events, the topics read in any interleaving, some events more than once,
    # in batches with ticks between
    saga = SAGAS[which]
    batches = data.draw(deliveries(saga), label="batches")
    audit = Harness.for_order(saga[0].order_id)
    # When they are audited (ticks never reach the wait: every cause does arrive in time)
    for batch in batches:
        audit.feed(*batch)
        audit.tick(timedelta(seconds=data.draw(st.integers(0, 1), label="seconds")))
    # Then each event is written exactly once, every event after its cause, with nothing left held
    assert_once_and_causal(audit.audited(), saga)
    state = audit.state(saga[0].order_id)
    assert state is not None
    assert state.held == {}
    assert state.closed
    assert audit.held_index().orders == {}
    # And re-sending anything afterwards writes nothing
    assert audit.feed(*saga) == []


@settings(max_examples=200, deadline=None)
@given(data=st.data(), which=st.sampled_from(range(len(SAGAS))))
def test_events_whose_causes_were_lost_are_still_written_once_after_the_wait(data: st.DataObject, which: int) -> None:
    # Given some of the order's events never reach the audit (dead-lettered upstream)
    saga = SAGAS[which]
    drawn = data.draw(st.lists(st.sampled_from(saga), min_size=1, unique_by=lambda e: e.event_id), label="kept")
    # In publication order: a topic never carries a service's events in an order it did not publish them.
    kept = sorted(drawn, key=saga.index)
    batches = data.draw(deliveries(kept), label="batches")
    audit = Harness.for_order(saga[0].order_id)
    # When the rest arrive in any order, and the wait passes
    for batch in batches:
        audit.feed(*batch)
    audit.tick(WAIT)
    # Then every event that arrived is written exactly once, after its cause whenever that arrived too
    assert_once_and_causal(audit.audited(), kept)
    state = audit.state(saga[0].order_id)
    assert state is not None
    assert state.held == {}
    assert audit.held_index().orders == {}

"""Approval, driven through its real StreamApp and TaskContext with in-memory stores (no broker)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from schemas.envelope import Envelope, Source
from schemas.events import (
    ApprovalDecisionIgnored,
    ApprovalDenied,
    ApprovalEscalated,
    ApprovalGranted,
    ApprovalRequested,
    ApprovalTimedOut,
    Event,
    OrderPlaced,
    PaymentDeclined,
)
from schemas.topics import APPROVAL_DECISIONS, APPROVAL_STATE, ORDERS, PAYMENT_EVENTS
from services.approval.app import build_app
from services.approval.domain import CLOSED, ApprovalState, ApprovalStatus, Problem, rule_on_decision
from services.approval.readmodel import ApprovalsView
from services.approval.settings import DEV_TOKEN, ApprovalSettings
from tests.approval.support import (
    DAY,
    T0,
    Harness,
    cancel,
    charged,
    decision,
    details,
    events,
    only,
    pending,
)

# --- settings ---------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    s = ApprovalSettings(_env_file=None)
    assert s.approval_threshold == Decimal("1000.00")
    assert s.approval_timeout == DAY
    assert s.approval_escalation_fraction == 0.5
    assert s.approval_token is None
    assert (s.approval_http_host, s.approval_http_port) == ("127.0.0.1", 8000)
    assert s.health_port == 8106


@pytest.mark.parametrize(("raw", "expected"), [("1", timedelta(seconds=1)), ("90", timedelta(seconds=90)),
                                               ("0.5", timedelta(seconds=0.5)), ("PT2H", timedelta(hours=2)),
                                               ("P1D", DAY)])  # fmt: skip
def test_timeout_from_env_in_seconds_or_iso_8601(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: timedelta
) -> None:
    monkeypatch.setenv("CHOREO_APPROVAL_TIMEOUT", raw)
    assert ApprovalSettings(_env_file=None).approval_timeout == expected


@pytest.mark.parametrize(
    ("name", "raw"),
    [("CHOREO_APPROVAL_TIMEOUT", "0"), ("CHOREO_APPROVAL_TIMEOUT", "soon"),
     ("CHOREO_APPROVAL_ESCALATION_FRACTION", "0"), ("CHOREO_APPROVAL_ESCALATION_FRACTION", "1")],
)  # fmt: skip
def test_invalid_timing_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, raw: str) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValidationError):
        ApprovalSettings(_env_file=None)


def test_token_is_required_and_real_outside_dev() -> None:
    with pytest.raises(ValidationError, match="approval_token"):
        ApprovalSettings(_env_file=None, environment="production")
    with pytest.raises(ValidationError, match="placeholder"):
        ApprovalSettings(_env_file=None, environment="test", approval_token=SecretStr("changeme"))
    with pytest.raises(ValidationError, match="dev default"):
        ApprovalSettings(_env_file=None, environment="production", approval_token=SecretStr(DEV_TOKEN))
    real = ApprovalSettings(_env_file=None, environment="production", approval_token=SecretStr("s3cr3t-t0ken"))
    assert real.reviewer_token() == "s3cr3t-t0ken"


def test_dev_mode_has_a_default_token_and_a_configured_one_wins() -> None:
    assert ApprovalSettings(_env_file=None).reviewer_token() == DEV_TOKEN
    assert ApprovalSettings(_env_file=None, approval_token=SecretStr("mine")).reviewer_token() == "mine"


def test_http_host_and_port_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHOREO_APPROVAL_HTTP_HOST", "0.0.0.0")
    monkeypatch.setenv("CHOREO_APPROVAL_HTTP_PORT", "0")
    s = ApprovalSettings(_env_file=None)
    assert (s.approval_http_host, s.approval_http_port) == ("0.0.0.0", 0)


def test_app_reads_payments_decisions_and_orders_and_keeps_its_own_changelog() -> None:
    app = build_app(ApprovalSettings(_env_file=None))
    assert app.name == "approval"
    assert tuple(app.inputs) == (PAYMENT_EVENTS, APPROVAL_DECISIONS, ORDERS)
    assert app.changelog is APPROVAL_STATE


# --- the charge -------------------------------------------------------------------------------


def test_charge_below_threshold_is_granted_by_the_system() -> None:
    h = Harness()
    charge = charged("o-1", "999.99")

    granted = only(h.feed(PAYMENT_EVENTS, charge))

    assert granted.data == ApprovalGranted(order=details("999.99"), reviewer="system", reason="below threshold")
    assert granted.causation_id == charge.event_id
    state = h.state("o-1")
    assert state is not None
    assert state.status is ApprovalStatus.GRANTED
    assert h.index("o-1").timers == {}


def test_charge_at_exactly_the_threshold_requests_a_reviewer_with_a_deadline() -> None:
    h = Harness()
    charge = charged("o-1", "1000.00")

    requested = only(h.feed(PAYMENT_EVENTS, charge))

    assert requested.data == ApprovalRequested(
        order=details("1000.00"), amount=Decimal("1000.00"), currency="EUR", deadline=T0 + DAY
    )
    assert requested.causation_id == charge.event_id
    state = h.state("o-1")
    assert state is not None
    assert state.status is ApprovalStatus.PENDING
    assert state.requested_event_id == str(requested.event_id)
    assert (state.escalate_at, state.deadline) == (T0 + DAY / 2, T0 + DAY)
    assert h.index("o-1").timers == {"o-1": T0 + DAY / 2}


def test_threshold_comes_from_settings() -> None:
    h = Harness(ApprovalSettings(_env_file=None, approval_threshold=Decimal("50")))
    assert isinstance(only(h.feed(PAYMENT_EVENTS, charged("o-1", "50.00"))).data, ApprovalRequested)
    assert isinstance(only(h.feed(PAYMENT_EVENTS, charged("o-2", "49.99"))).data, ApprovalGranted)


def test_other_payment_events_and_order_placed_are_ignored_without_state() -> None:
    h = Harness()
    declined = PaymentDeclined(customer_id="cust-1", amount=Decimal(5), currency="EUR", reason="no credit")
    placed = OrderPlaced(**details().model_dump())
    assert h.feed(PAYMENT_EVENTS, Envelope.new(declined, order_id="o-1", source=Source.PAYMENT)) == []
    assert h.feed(ORDERS, Envelope.new(placed, order_id="o-1", source=Source.CLIENT)) == []
    assert h.state("o-1") is None


def test_redelivered_charge_re_emits_the_same_request() -> None:
    h = Harness()
    charge = charged("o-1")
    first = h.feed(PAYMENT_EVENTS, charge)
    assert h.feed(PAYMENT_EVENTS, charge) == first
    assert h.feed(PAYMENT_EVENTS, charged("o-1")) == []  # another charge for a ruled order changes nothing


# --- decisions --------------------------------------------------------------------------------


def test_reviewer_approves_a_pending_approval() -> None:
    h = Harness()
    pending(h)
    approve = decision("o-1", True, "alice", T0 + timedelta(hours=1), "looks fine")

    granted = only(h.feed(APPROVAL_DECISIONS, approve))

    assert granted.data == ApprovalGranted(
        order=details("1500.00"), reviewer="alice", reason="approved by reviewer", comment="looks fine"
    )
    assert granted.causation_id == approve.event_id
    state = h.state("o-1")
    assert state is not None
    assert (state.status, state.reviewer, state.decision_event_id) == (
        ApprovalStatus.GRANTED,
        "alice",
        str(approve.event_id),
    )
    assert h.index("o-1").timers == {}
    assert h.tick(T0 + 2 * DAY) == []


def test_reviewer_denies_a_pending_approval() -> None:
    h = Harness()
    pending(h)

    denied = only(h.feed(APPROVAL_DECISIONS, decision("o-1", False, "bob", T0, "too risky")))

    assert denied.data == ApprovalDenied(reviewer="bob", comment="too risky")
    state = h.state("o-1")
    assert state is not None
    assert state.status is ApprovalStatus.DENIED
    assert h.tick(T0 + 2 * DAY) == []


def test_first_decision_wins_and_the_second_is_ignored() -> None:
    h = Harness()
    pending(h)
    h.feed(APPROVAL_DECISIONS, decision("o-1", True, "alice"))
    late = decision("o-1", False, "bob")

    ignored = only(h.feed(APPROVAL_DECISIONS, late))

    assert ignored.data == ApprovalDecisionIgnored(
        decision_event_id=str(late.event_id), reviewer="bob", reason="the approval was already granted by alice"
    )
    assert ignored.causation_id == late.event_id
    state = h.state("o-1")
    assert state is not None
    assert state.status is ApprovalStatus.GRANTED


def test_redelivered_decision_repeats_its_outcome_instead_of_being_ignored() -> None:
    h = Harness()
    pending(h)
    approve = decision("o-1")
    first = h.feed(APPROVAL_DECISIONS, approve)
    assert h.feed(APPROVAL_DECISIONS, approve) == first


def test_decision_after_the_deadline_is_ignored_and_the_timeout_still_fires() -> None:
    h = Harness()
    pending(h)
    late = decision("o-1", True, "alice", T0 + DAY)

    ignored = only(h.feed(APPROVAL_DECISIONS, late))

    assert isinstance(ignored.data, ApprovalDecisionIgnored)
    assert "after the deadline" in ignored.data.reason
    assert isinstance(only(h.tick(T0 + DAY)).data, ApprovalTimedOut)


def test_decision_before_any_charge_is_ignored() -> None:
    h = Harness()
    early = decision("o-1")

    ignored = only(h.feed(APPROVAL_DECISIONS, early))

    assert ignored.data == ApprovalDecisionIgnored(
        decision_event_id=str(early.event_id), reviewer="alice", reason="no approval has been requested for this order"
    )
    # The charge that follows still opens the approval, and a new decision then counts.
    pending(h)
    assert isinstance(only(h.feed(APPROVAL_DECISIONS, decision("o-1"))).data, ApprovalGranted)


def test_decision_for_a_system_grant_is_ignored() -> None:
    h = Harness()
    h.feed(PAYMENT_EVENTS, charged("o-1", "10.00"))
    ignored = only(h.feed(APPROVAL_DECISIONS, decision("o-1", False)))
    assert isinstance(ignored.data, ApprovalDecisionIgnored)
    assert ignored.data.reason == "the approval was already granted by system"


# --- timers -----------------------------------------------------------------------------------


def test_timeout_fires_once_at_the_deadline() -> None:
    h = Harness()
    requested = pending(h)
    h.tick(T0 + DAY / 2)  # escalation

    assert h.tick(T0 + DAY - timedelta(microseconds=1)) == []
    timed_out = only(h.tick(T0 + DAY))
    assert h.tick(T0 + DAY + timedelta(seconds=1)) == []
    assert h.tick(T0 + 3 * DAY) == []

    assert timed_out.data == ApprovalTimedOut(deadline=T0 + DAY)
    assert timed_out.causation_id == requested.event_id
    assert timed_out.occurred_at == T0 + DAY
    state = h.state("o-1")
    assert state is not None
    assert state.status is ApprovalStatus.TIMED_OUT
    assert h.index("o-1").timers == {}
    ignored = only(h.feed(APPROVAL_DECISIONS, decision("o-1", True, "alice", T0)))
    assert isinstance(ignored.data, ApprovalDecisionIgnored)
    assert ignored.data.reason == "the approval timed out"


def test_escalation_fires_once_at_its_fraction_of_the_timeout() -> None:
    h = Harness(ApprovalSettings(_env_file=None, approval_escalation_fraction=0.25))
    requested = pending(h)

    assert h.tick(T0 + DAY / 4 - timedelta(seconds=1)) == []
    escalated = only(h.tick(T0 + DAY / 4))
    assert h.tick(T0 + DAY / 4 + timedelta(seconds=1)) == []
    assert h.tick(T0 + DAY / 2) == []

    assert escalated.data == ApprovalEscalated(deadline=T0 + DAY)
    assert escalated.causation_id == requested.event_id
    state = h.state("o-1")
    assert state is not None
    assert (state.status, state.escalated) == (ApprovalStatus.PENDING, True)
    assert h.index("o-1").timers == {"o-1": T0 + DAY}
    # A decision after the escalation still counts.
    assert isinstance(only(h.feed(APPROVAL_DECISIONS, decision("o-1", at=T0 + DAY / 2))).data, ApprovalGranted)


def test_deadline_passed_while_down_times_out_once_on_the_first_tick_after_restart() -> None:
    h = Harness()
    requested = pending(h)
    h.restart()

    timed_out = only(h.tick(T0 + 2 * DAY))  # no escalation for an approval already over

    assert timed_out.data == ApprovalTimedOut(deadline=T0 + DAY)
    assert timed_out.causation_id == requested.event_id
    h.restart()
    assert h.tick(T0 + 3 * DAY) == []


def test_a_one_second_timeout() -> None:
    h = Harness(ApprovalSettings(_env_file=None, approval_timeout=timedelta(seconds=1)))
    pending(h)
    assert isinstance(only(h.tick(T0 + timedelta(milliseconds=500))).data, ApprovalEscalated)
    assert isinstance(only(h.tick(T0 + timedelta(seconds=1))).data, ApprovalTimedOut)


def test_ticks_touch_only_the_due_approvals() -> None:
    h = Harness()
    pending(h, "o-early", T0)
    pending(h, "o-late", T0 + DAY)
    h.feed(PAYMENT_EVENTS, charged("o-small", "1.00"))

    outs = h.tick(T0 + DAY)

    assert [(out.key, type(out.envelope.data)) for out in outs if out.envelope] == [("o-early", ApprovalTimedOut)]
    late = h.state("o-late")
    assert late is not None
    assert late.status is ApprovalStatus.PENDING


# --- cancellation -----------------------------------------------------------------------------


def test_cancellation_while_pending_closes_the_approval_silently() -> None:
    h = Harness()
    pending(h)

    assert h.feed(ORDERS, cancel("o-1")) == []

    state = h.state("o-1")
    assert state is not None
    assert (state.status, state.cancelled) == (ApprovalStatus.CANCELLED, True)
    assert h.index("o-1").timers == {}
    assert h.tick(T0 + 2 * DAY) == []
    ignored = only(h.feed(APPROVAL_DECISIONS, decision("o-1")))
    assert isinstance(ignored.data, ApprovalDecisionIgnored)
    assert ignored.data.reason == "the order was cancelled"


def test_cancellation_before_the_charge_means_the_charge_is_never_approved() -> None:
    h = Harness()
    assert h.feed(ORDERS, cancel("o-1")) == []
    assert h.feed(PAYMENT_EVENTS, charged("o-1", "10.00")) == []
    assert h.feed(PAYMENT_EVENTS, charged("o-2", "10.00")) != []  # other orders unaffected
    state = h.state("o-1")
    assert state is not None
    assert (state.status, state.cancelled) == (ApprovalStatus.AWAITING_PAYMENT, True)
    assert "cancelled" in str(events(h.feed(APPROVAL_DECISIONS, decision("o-1")))[0])


def test_cancellation_after_a_grant_is_remembered_but_changes_nothing() -> None:
    h = Harness()
    h.feed(PAYMENT_EVENTS, charged("o-1", "10.00"))
    assert h.feed(ORDERS, cancel("o-1")) == []
    state = h.state("o-1")
    assert state is not None
    assert (state.status, state.cancelled) == (ApprovalStatus.GRANTED, True)


# --- poison -----------------------------------------------------------------------------------


def test_poison_messages_are_dead_lettered_with_the_reason() -> None:
    h = Harness()
    p = h.partition("o-1")
    good = decision("o-1")
    cases = [
        (APPROVAL_DECISIONS, b"o-1", b"{", p, "not JSON"),
        (APPROVAL_DECISIONS, b"o-1", None, p, "null value"),
        (PAYMENT_EVENTS, b"o-1", good.to_bytes(), p, "not carried on topic"),
        (APPROVAL_DECISIONS, b"o-9", good.to_bytes(), h.partition("o-9"), "key"),
        (PAYMENT_EVENTS, b"o-1", charged("o-1").to_bytes(), (p + 1) % h.settings.partitions, "partition"),
    ]
    for topic, key, value, partition, reason in cases:
        [out] = h.feed_raw(topic, key, value, partition)
        assert out.dead_letter is not None
        assert reason in out.dead_letter.reason
        assert out.dead_letter.consumer == "approval"
    assert h.state("o-1") is None


# --- the rules and the read side an HTTP layer uses ------------------------------------------


def test_rule_on_decision_distinguishes_missing_from_closed() -> None:
    open_state = ApprovalState(order_id="o-1", status=ApprovalStatus.PENDING, order=details(), deadline=T0)
    assert rule_on_decision(None, T0).problem is Problem.NOT_FOUND
    assert rule_on_decision(ApprovalState(order_id="o-1"), T0).problem is Problem.NOT_FOUND
    assert rule_on_decision(open_state, T0 - timedelta(seconds=1)).accepted
    assert rule_on_decision(open_state, T0).problem is Problem.CONFLICT
    for status in CLOSED:
        closed = open_state.model_copy(update={"status": status, "cancelled": status is ApprovalStatus.CANCELLED})
        assert rule_on_decision(closed, T0 - DAY).problem is Problem.CONFLICT


def view_of(h: Harness) -> ApprovalsView:
    """The reviewer API's read model, fed with everything the harness's tasks wrote to their changelogs."""
    view = ApprovalsView()
    for records in h.changelog.values():
        for key, value in records:
            view.apply(key, value)
    view.mark_caught_up()
    return view


def test_read_model_lists_by_status_from_every_partition() -> None:
    h = Harness()
    pending(h, "o-pending-late", T0 + timedelta(hours=1))
    pending(h, "o-pending")
    pending(h, "o-approved")
    h.feed(APPROVAL_DECISIONS, decision("o-approved", at=T0 + timedelta(minutes=5)))
    h.feed(PAYMENT_EVENTS, charged("o-small", "1.00", at=T0 + timedelta(minutes=9)))
    h.feed(ORDERS, cancel("o-never-charged"))
    pending(h, "o-cancelled")
    h.feed(ORDERS, cancel("o-cancelled"))
    assert len({h.partition(o) for o in ("o-pending", "o-approved", "o-small", "o-cancelled")}) > 1

    view = view_of(h)

    page = view.page(ApprovalStatus.PENDING, 10, 0)
    assert [s.order_id for s in page.items] == ["o-pending", "o-pending-late"]  # earliest deadline first
    assert page.total == 2
    assert [s.order_id for s in view.page(ApprovalStatus.GRANTED, 10, 0).items] == ["o-small", "o-approved"]
    assert sorted(s.order_id for s in view.page(ApprovalStatus.CANCELLED, 10, 0).items) == [
        "o-cancelled",
        "o-never-charged",
    ]
    assert [s.order_id for s in view.page(ApprovalStatus.PENDING, 1, 1).items] == ["o-pending-late"]
    assert view.page(ApprovalStatus.PENDING, 10, 5).items == []
    found = view.get("o-pending")
    assert found is not None
    assert found.handled == {}  # the deduplication record stays on the stream side
    assert rule_on_decision(found, T0).accepted
    assert view.get("o-unknown") is None


def test_read_model_follows_updates_and_tombstones_and_skips_the_deadline_index() -> None:
    h = Harness()
    pending(h)
    view = view_of(h)
    before = len(view)
    h.feed(APPROVAL_DECISIONS, decision("o-1"))
    for key, value in h.changelog[h.partition("o-1")][-2:]:
        view.apply(key, value)
    state = view.get("o-1")
    assert state is not None
    assert state.status is ApprovalStatus.GRANTED
    assert len(view) == before == 1
    view.apply("order:o-1", None)
    assert view.get("o-1") is None
    view.apply("order:o-bad", b"{not json")
    assert view.get("o-bad") is None


def test_a_claim_holds_until_the_order_is_ruled() -> None:
    h = Harness()
    pending(h)
    view = view_of(h)
    assert view.claim("o-1", "d-1") is None
    assert view.claim("o-1", "d-2") == "d-1"
    view.release("o-1", "d-2")  # not the holder: no effect
    assert view.claimed("o-1") == "d-1"
    h.feed(APPROVAL_DECISIONS, decision("o-1"))
    for key, value in h.changelog[h.partition("o-1")]:
        view.apply(key, value)
    assert view.claimed("o-1") is None
    view.release("o-2", "d-9")
    assert view.claim("o-2", "d-3") is None
    view.release("o-2", "d-3")
    assert view.claimed("o-2") is None


# --- properties -------------------------------------------------------------------------------

TIMEOUT = timedelta(hours=1)
STEPS = ("charge", "approve", "deny", "late-approve", "cancel", "tick-escalate", "tick-deadline", "tick-early")
OUTCOMES = (ApprovalGranted, ApprovalDenied, ApprovalTimedOut)
ACTIONS = (ApprovalRequested, ApprovalEscalated, *OUTCOMES)


@settings(max_examples=400, deadline=None)
@given(
    steps=st.lists(st.sampled_from(STEPS), min_size=1, max_size=14),
    large=st.booleans(),
    with_cancel=st.booleans(),
)
def test_every_arrival_order_rules_once_and_never_after_a_cancellation(
    steps: list[str], large: bool, with_cancel: bool
) -> None:
    h = Harness(ApprovalSettings(_env_file=None, approval_timeout=TIMEOUT))
    if not with_cancel:
        steps = [step for step in steps if step != "cancel"]
    # Every trigger arrives at least once, then a tick far past any deadline.
    steps = [*steps, *[s for s in ("charge", "approve", "deny", "late-approve") if s not in steps]]
    if with_cancel and "cancel" not in steps:
        steps.append("cancel")
    steps.append("tick-final")
    feeds = {
        "charge": (PAYMENT_EVENTS, charged("o-1", "1500.00" if large else "20.00", T0)),
        "approve": (APPROVAL_DECISIONS, decision("o-1", True, "alice", T0 + timedelta(minutes=1))),
        "deny": (APPROVAL_DECISIONS, decision("o-1", False, "bob", T0 + timedelta(minutes=2))),
        "late-approve": (APPROVAL_DECISIONS, decision("o-1", True, "carol", T0 + TIMEOUT)),
        "cancel": (ORDERS, cancel("o-1")),
    }
    ticks = {
        "tick-early": T0 + TIMEOUT / 4,
        "tick-escalate": T0 + TIMEOUT * 0.75,
        "tick-deadline": T0 + TIMEOUT,
        "tick-final": T0 + 10 * TIMEOUT,
    }
    decision_ids = {str(feeds[name][1].event_id) for name in ("approve", "deny", "late-approve")}

    emitted: dict[str, Envelope] = {}  # distinct event ids, in first-emission order
    new_after_cancel: list[Event] = []
    cancelled = charge_seen = False
    for step in steps:
        charge_seen = charge_seen or step == "charge"
        outs = h.tick(ticks[step]) if step in ticks else h.feed(*feeds[step])
        for out in outs:
            assert out.envelope is not None, out.dead_letter
            if str(out.envelope.event_id) in emitted:
                continue
            emitted[str(out.envelope.event_id)] = out.envelope
            if cancelled:
                new_after_cancel.append(out.envelope.data)
            if isinstance(out.envelope.data, ACTIONS):
                assert charge_seen
        cancelled = cancelled or step == "cancel"

    kinds = [type(envelope.data) for envelope in emitted.values()]
    assert [event for event in new_after_cancel if isinstance(event, ACTIONS)] == []
    assert kinds.count(ApprovalRequested) <= 1
    assert kinds.count(ApprovalEscalated) <= 1
    outcomes = [kind for kind in kinds if kind in OUTCOMES]
    assert len(outcomes) <= 1
    if ApprovalEscalated in kinds and outcomes:
        assert kinds.index(ApprovalEscalated) < kinds.index(outcomes[0])

    # Every distinct decision got exactly one answer: the outcome it caused, or an ignore.
    answers: dict[str, int] = {}
    for envelope in emitted.values():
        data = envelope.data
        if isinstance(data, ApprovalDecisionIgnored):
            answers[data.decision_event_id] = answers.get(data.decision_event_id, 0) + 1
        elif isinstance(data, ApprovalGranted | ApprovalDenied) and str(envelope.causation_id) in decision_ids:
            answers[str(envelope.causation_id)] = answers.get(str(envelope.causation_id), 0) + 1
    assert answers == dict.fromkeys(decision_ids, 1)

    state = h.state("o-1")
    assert state is not None
    assert h.index("o-1").timers == {}
    cancelled_before_charge = with_cancel and steps.index("cancel") < steps.index("charge")
    if cancelled_before_charge:
        assert outcomes == []
        assert ApprovalRequested not in kinds
    elif not large:
        assert outcomes == [ApprovalGranted]
        assert state.status is ApprovalStatus.GRANTED
    elif outcomes:
        assert state.status in {ApprovalStatus.GRANTED, ApprovalStatus.DENIED, ApprovalStatus.TIMED_OUT}
    else:
        assert with_cancel
        assert state.status is ApprovalStatus.CANCELLED

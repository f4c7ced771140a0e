"""Approval, driven through its real StreamApp and TaskContext with in-memory stores (no broker)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from schemas.deadletter import DeadLetter
from schemas.envelope import Envelope, Source
from schemas.events import (
    Address,
    ApprovalDecisionIgnored,
    ApprovalDecisionSubmitted,
    ApprovalDenied,
    ApprovalEscalated,
    ApprovalGranted,
    ApprovalRequested,
    ApprovalTimedOut,
    Event,
    OrderCancellationRequested,
    OrderDetails,
    OrderLine,
    OrderPlaced,
    PaymentCharged,
    PaymentDeclined,
)
from schemas.topics import (
    APPROVAL_DECISIONS,
    APPROVAL_EVENTS,
    APPROVAL_STATE,
    DEAD_LETTER,
    ORDERS,
    PAYMENT_EVENTS,
    Topic,
)
from services.approval.app import ApprovalApp, build_app
from services.approval.domain import (
    CLOSED,
    DEADLINES_KEY,
    ApprovalState,
    ApprovalStatus,
    DeadlineIndex,
    Problem,
    rule_on_decision,
)
from services.approval.settings import ApprovalSettings
from services.approval.views import find_approval, list_approvals
from services.common.processor import Incoming, KeyedStore, TaskContext
from services.common.saga import order_key, partition_for

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(hours=24)


# --- harness ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Out:
    topic: str
    key: str | None
    envelope: Envelope | None
    dead_letter: DeadLetter | None


class Harness:
    """Every task of the app with an in-memory store and changelog; each feed or tick is one committed batch."""

    def __init__(self, app_settings: ApprovalSettings | None = None) -> None:
        self.settings = app_settings or ApprovalSettings(_env_file=None)
        self.app: ApprovalApp = build_app(self.settings)
        self.stores = {p: KeyedStore() for p in range(self.settings.partitions)}
        self.changelog: dict[int, list[tuple[str, bytes | None]]] = {p: [] for p in self.stores}
        self._offsets = itertools.count()

    def partition(self, order_id: str) -> int:
        return partition_for(order_id.encode(), self.settings.partitions)

    def feed(self, topic: Topic, envelope: Envelope) -> list[Out]:
        return self.feed_raw(topic, envelope.key, envelope.to_bytes(), self.partition(envelope.order_id))

    def feed_raw(self, topic: Topic, key: bytes | None, value: bytes | None, partition: int) -> list[Out]:
        message = Incoming(topic, partition, next(self._offsets), key, value, 0)
        return self._run(partition, lambda task: self.app.process(task, message))

    def tick(self, now: datetime) -> list[Out]:
        return [out for p in self.stores for out in self._run(p, lambda task: self.app.tick(task, now))]

    def restart(self) -> None:
        """A new instance of the app, its stores restored from the changelog as the runner does."""
        self.app = build_app(self.settings)
        self.stores = {p: KeyedStore() for p in self.stores}
        for p, records in self.changelog.items():
            for key, value in records:
                self.stores[p].restore(key, value)

    def state(self, order_id: str) -> ApprovalState | None:
        return self.stores[self.partition(order_id)].get(order_key(order_id), ApprovalState)

    def index(self, order_id: str) -> DeadlineIndex:
        store = self.stores[self.partition(order_id)]
        return store.get(DEADLINES_KEY, DeadlineIndex) or DeadlineIndex()

    def _run(self, partition: int, work: object) -> list[Out]:
        store = self.stores[partition]
        task = TaskContext(partition, self.settings, self.app.name, store)
        assert callable(work)
        work(task)
        self.changelog[partition].extend(store.pending_changes().items())
        store.commit()
        outs = []
        for out in task.outbox:
            assert out.value is not None
            key = out.key.decode() if out.key is not None else None
            if out.topic == self.settings.topic(DEAD_LETTER):
                outs.append(Out(out.topic, key, None, DeadLetter.model_validate_json(out.value)))
            else:
                outs.append(Out(out.topic, key, Envelope.from_bytes(out.value), None))
        return outs


def details(total: str = "1000.00", country: str = "FR") -> OrderDetails:
    return OrderDetails(
        customer_id="cust-1",
        items=[OrderLine(sku="sku-a", quantity=1, unit_price=Decimal(total))],
        currency="EUR",
        ship_to=Address(country=country),
    )


def charged(order_id: str, total: str = "1000.00", at: datetime = T0) -> Envelope:
    order = details(total)
    event = PaymentCharged(order=order, amount=order.total, currency="EUR")
    return Envelope.new(event, order_id=order_id, source=Source.PAYMENT, occurred_at=at)


def decision(
    order_id: str, approved: bool = True, reviewer: str = "alice", at: datetime = T0, comment: str | None = None
) -> Envelope:
    event = ApprovalDecisionSubmitted(approved=approved, reviewer=reviewer, comment=comment)
    return Envelope.new(event, order_id=order_id, source=Source.CLIENT, occurred_at=at)


def cancel(order_id: str, reason: str = "changed my mind") -> Envelope:
    return Envelope.new(OrderCancellationRequested(reason=reason), order_id=order_id, source=Source.CLIENT)


def events(outs: list[Out]) -> list[Event]:
    return [out.envelope.data for out in outs if out.envelope is not None]


def only(outs: list[Out]) -> Envelope:
    [out] = outs
    assert out.envelope is not None
    assert out.topic == APPROVAL_EVENTS.name
    assert out.key == out.envelope.order_id
    assert out.envelope.source is Source.APPROVAL
    return out.envelope


def pending(h: Harness, order_id: str = "o-1", at: datetime = T0) -> Envelope:
    """Bring the order to a pending approval; the ApprovalRequested envelope."""
    return only(h.feed(PAYMENT_EVENTS, charged(order_id, "1500.00", at)))


# --- settings ---------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    s = ApprovalSettings(_env_file=None)
    assert s.approval_threshold == Decimal("1000.00")
    assert s.approval_timeout == DAY
    assert s.approval_escalation_fraction == 0.5
    assert s.approval_token is None
    assert (s.approval_http_host, s.approval_http_port) == ("127.0.0.1", 8000)
    assert s.health_port == 0


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
    real = ApprovalSettings(_env_file=None, environment="production", approval_token=SecretStr("s3cr3t-t0ken"))
    assert real.approval_token is not None


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
        (APPROVAL_DECISIONS, b"o-9", good.to_bytes(), p, "key"),
        (APPROVAL_DECISIONS, b"o-1", good.to_bytes(), (p + 1) % h.settings.partitions, "partition"),
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


def test_list_approvals_by_status_and_find_one() -> None:
    h = Harness()
    pending(h, "o-pending")
    pending(h, "o-approved")
    h.feed(APPROVAL_DECISIONS, decision("o-approved"))
    h.feed(PAYMENT_EVENTS, charged("o-small", "1.00"))
    h.feed(ORDERS, cancel("o-never-charged"))
    stores = list(h.stores.values())

    assert [v.order_id for v in list_approvals(stores, ApprovalStatus.PENDING)] == ["o-pending"]
    assert [v.order_id for v in list_approvals(stores, ApprovalStatus.GRANTED)] == ["o-approved", "o-small"]
    assert sorted(v.order_id for v in list_approvals(stores)) == ["o-approved", "o-pending", "o-small"]
    [view] = list_approvals(stores, ApprovalStatus.PENDING)
    assert (view.amount, view.currency, view.customer_id, view.deadline) == (
        Decimal("1500.00"),
        "EUR",
        "cust-1",
        T0 + DAY,
    )
    found = find_approval(stores, "o-pending")
    assert found is not None
    assert rule_on_decision(found, T0).accepted
    assert find_approval(stores, "o-unknown") is None


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

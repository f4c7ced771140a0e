"""The reviewer API in process (no broker): its read model fed from the stream app's changelog, a recording publisher.

Decisions the API publishes are fed back into the real stream app, so each answer the API gives
(202 or 409) is checked against what the stream side then does with the decision.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from schemas.envelope import Source
from schemas.events import ApprovalDecisionIgnored, ApprovalDecisionSubmitted, ApprovalDenied, ApprovalGranted
from schemas.topics import APPROVAL_DECISIONS, ORDERS, PAYMENT_EVENTS
from services.approval.api import create_api
from services.approval.domain import ApprovalState
from services.approval.readmodel import ApprovalsView
from services.approval.settings import ApprovalSettings
from tests.approval.support import DAY, T0, Clock, Harness, RecordingPublisher, cancel, charged, decision, only, pending

TOKEN = "api-test-token-7c1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APPROVE = {"approved": True, "reviewer": "alice", "comment": "ok"}


class Client:
    """A synchronous client calling the ASGI app in process, one event loop per request."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def request(self, method: str, url: str, **options: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
                return await client.request(method, url, **options)

        return asyncio.run(send())

    def get(self, url: str, **options: Any) -> httpx.Response:
        return self.request("GET", url, **options)

    def post(self, url: str, **options: Any) -> httpx.Response:
        return self.request("POST", url, **options)


class Api:
    """The stream app (harness), the read model fed from its changelog and the HTTP client, side by side."""

    def __init__(self, now: datetime = T0 + timedelta(minutes=10)) -> None:
        self.harness = Harness(ApprovalSettings(_env_file=None, environment="test", approval_token=SecretStr(TOKEN)))
        self.view = ApprovalsView()
        self.view.mark_caught_up()
        self.publisher = RecordingPublisher()
        self.clock = Clock(now)
        self.app = create_api(self.harness.settings, self.view, self.publisher, self.clock)
        self.client = Client(self.app)
        self._fed = dict.fromkeys(self.harness.changelog, 0)

    def sync(self) -> None:
        """Let the read model catch up with the changelog."""
        for partition, records in self.harness.changelog.items():
            for key, value in records[self._fed[partition] :]:
                self.view.apply(key, value)
            self._fed[partition] = len(records)

    def deliver(self) -> list[Any]:
        """Feed every published decision to the stream app; its reactions."""
        outs = []
        for envelope in self.publisher.published:
            outs.extend(self.harness.feed(APPROVAL_DECISIONS, envelope))
        self.publisher.published.clear()
        self.sync()
        return outs

    def decide(self, order_id: str, body: Any = None) -> httpx.Response:
        url = f"/approvals/{order_id}/decision"
        if isinstance(body, bytes):
            return self.client.post(url, content=body, headers=AUTH | {"Content-Type": "application/json"})
        return self.client.post(url, json=APPROVE if body is None else body, headers=AUTH)


@pytest.fixture
def api() -> Api:
    running = Api()
    pending(running.harness, "o-1")
    running.sync()
    return running


# --- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"},
     {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer t\u00f6ken".encode("latin-1")}],
)  # fmt: skip
def test_every_approvals_route_needs_the_token(api: Api, headers: dict[str, Any]) -> None:
    for response in (
        api.client.get("/approvals", headers=headers),
        api.client.get("/approvals/o-1", headers=headers),
        api.client.post("/approvals/o-1/decision", json=APPROVE, headers=headers),
        api.client.post("/approvals/o-1/decision", content=b"{not json", headers=headers),
        api.client.get("/approvals?limit=0", headers=headers),
    ):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in response.json()["detail"]
    assert api.publisher.published == []


def test_missing_and_wrong_tokens_are_told_apart(api: Api) -> None:
    assert api.client.get("/approvals").json()["detail"].startswith("missing bearer token")
    assert api.client.get("/approvals", headers={"Authorization": "Bearer nope"}).json()["detail"] == (
        "invalid bearer token"
    )


def test_health_page_and_schema_need_no_token(api: Api) -> None:
    assert api.client.get("/health").status_code == 200
    page = api.client.get("/")
    assert page.status_code == 200
    assert "Pending approvals" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert api.client.get("/static/reviewer.js").status_code == 200
    assert api.client.get("/openapi.json").status_code == 200


# --- reading ----------------------------------------------------------------------------------


def test_list_pending_with_amount_customer_and_items(api: Api) -> None:
    pending(api.harness, "o-2", T0 + timedelta(minutes=1))
    api.sync()

    response = api.client.get("/approvals", params={"status": "pending"}, headers=AUTH)

    assert response.status_code == 200
    body = response.json()
    assert (body["total"], body["limit"], body["offset"]) == (2, 50, 0)
    first = body["items"][0]
    assert [item["order_id"] for item in body["items"]] == ["o-1", "o-2"]
    assert (first["status"], first["amount"], first["currency"], first["customer_id"]) == (
        "pending",
        "1500.00",
        "EUR",
        "cust-1",
    )
    assert first["items"] == [{"sku": "sku-a", "quantity": 1, "unit_price": "1500.00"}]
    assert first["deadline"] == "2030-01-02T12:00:00Z"
    page = api.client.get("/approvals", params={"limit": 1, "offset": 1}, headers=AUTH).json()
    assert ([item["order_id"] for item in page["items"]], page["total"]) == (["o-2"], 2)


def test_get_one_and_404_for_orders_without_approval(api: Api) -> None:
    api.harness.feed(ORDERS, cancel("o-cancelled-early"))
    api.harness.feed(PAYMENT_EVENTS, charged("o-small", "5.00"))
    api.sync()

    assert api.client.get("/approvals/o-1", headers=AUTH).json()["status"] == "pending"
    small = api.client.get("/approvals/o-small", headers=AUTH).json()
    assert (small["status"], small["reviewer"], small["requested_at"]) == ("granted", "system", None)
    early = api.client.get("/approvals/o-cancelled-early", headers=AUTH).json()
    assert (early["status"], early["order_cancelled"], early["items"]) == ("cancelled", True, [])
    missing = api.client.get("/approvals/o-unknown", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no approval for order o-unknown"}


def test_503_while_the_read_model_loads() -> None:
    loading = Api()
    loading.view = ApprovalsView()
    loading.app = create_api(loading.harness.settings, loading.view, loading.publisher, loading.clock)
    client = Client(loading.app)
    assert client.get("/approvals", headers=AUTH).status_code == 503
    assert client.get("/health").status_code == 503
    assert client.get("/health").json()["status"] == "starting"


# --- deciding ---------------------------------------------------------------------------------


def test_a_decision_is_published_with_the_reviewer_and_the_submission_time(api: Api) -> None:
    response = api.decide("o-1", {"approved": True, "reviewer": "alice", "comment": "verified"})

    assert response.status_code == 202
    body = response.json()
    [published] = api.publisher.published
    assert body == {
        "decision_event_id": str(published.event_id),
        "order_id": "o-1",
        "approved": True,
        "reviewer": "alice",
        "submitted_at": "2030-01-01T12:10:00Z",
    }
    assert response.headers["location"] == "/approvals/o-1"
    assert published.data == ApprovalDecisionSubmitted(approved=True, reviewer="alice", comment="verified")
    assert (published.order_id, published.source, published.occurred_at) == ("o-1", Source.APPROVAL, api.clock.now)
    assert published.causation_id is None

    granted = only(api.deliver())
    assert isinstance(granted.data, ApprovalGranted)
    assert (granted.data.reviewer, granted.data.reason, granted.data.comment) == (
        "alice",
        "approved by reviewer",
        "verified",
    )
    assert granted.causation_id == published.event_id
    shown = api.client.get("/approvals/o-1", headers=AUTH).json()
    assert (shown["status"], shown["reviewer"], shown["decision_event_id"]) == (
        "granted",
        "alice",
        str(published.event_id),
    )


def test_a_denial(api: Api) -> None:
    assert api.decide("o-1", {"approved": False, "reviewer": "bob", "comment": None}).status_code == 202
    assert only(api.deliver()).data == ApprovalDenied(reviewer="bob", comment=None)
    assert api.client.get("/approvals?status=denied", headers=AUTH).json()["total"] == 1


def test_a_second_decision_gets_409_before_and_after_the_first_is_ruled(api: Api) -> None:
    assert api.decide("o-1").status_code == 202
    in_flight = api.decide("o-1", {"approved": False, "reviewer": "bob"})
    assert in_flight.status_code == 409
    assert "already being processed" in in_flight.json()["detail"]
    assert api.client.get("/approvals/o-1", headers=AUTH).json()["decision_in_flight"] is not None

    api.deliver()
    ruled = api.decide("o-1", {"approved": False, "reviewer": "bob"})
    assert ruled.status_code == 409
    assert ruled.json()["detail"] == "order o-1: the approval was already granted by alice"
    assert len(api.publisher.published) == 0


def test_404_for_an_order_with_no_approval(api: Api) -> None:
    response = api.decide("o-unknown")
    assert response.status_code == 404
    assert response.json()["detail"] == "order o-unknown: no approval has been requested for this order"
    assert api.publisher.published == []


def test_409_past_the_deadline_even_before_the_timer_fired(api: Api) -> None:
    api.clock.now = T0 + DAY
    response = api.decide("o-1")
    assert response.status_code == 409
    assert "after the deadline" in response.json()["detail"]


def test_409_once_timed_out_or_cancelled(api: Api) -> None:
    api.harness.tick(T0 + DAY)
    pending(api.harness, "o-2")
    api.harness.feed(ORDERS, cancel("o-2"))
    api.sync()
    assert api.decide("o-1").json() == {"detail": "order o-1: the approval timed out"}
    assert api.decide("o-2").json() == {"detail": "order o-2: the order was cancelled"}
    assert api.decide("o-2").status_code == 409


def test_a_failed_publish_is_503_and_frees_the_order(api: Api) -> None:
    api.publisher.failing = True
    response = api.decide("o-1")
    assert response.status_code == 503
    assert "retry" in response.json()["detail"]
    api.publisher.failing = False
    assert api.decide("o-1").status_code == 202


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"reviewer": "alice"}, "body.approved: Field required"),
        ({"approved": "yes", "reviewer": "alice"}, "body.approved: Input should be a valid boolean"),
        ({"approved": 1, "reviewer": "alice"}, "body.approved"),
        ({"approved": True}, "body.reviewer: Field required"),
        ({"approved": True, "reviewer": ""}, "body.reviewer"),
        ({"approved": True, "reviewer": "   "}, "body.reviewer: String should match pattern"),
        ({"approved": True, "reviewer": "x" * 101}, "body.reviewer: String should have at most 100 characters"),
        ({"approved": True, "reviewer": "alice", "comment": "x" * 1001}, "body.comment"),
        ({"approved": True, "reviewer": "alice", "extra": 1}, "body.extra: Extra inputs are not permitted"),
        (b'{"approved": true, "reviewer": "\\ud800"}', "body.reviewer: Input should be a valid string"),
        ([], "body: Input should be a valid dictionary"),
        (None, "body: Field required"),
    ],
)
def test_malformed_bodies_are_422_with_a_message(api: Api, body: Any, where: str) -> None:
    response = api.decide("o-1", body) if body is not None else api.client.post("/approvals/o-1/decision", headers=AUTH)
    assert response.status_code == 422, response.text
    assert where in response.json()["detail"]
    assert response.json()["errors"]
    assert api.publisher.published == []


def test_a_body_that_is_not_json_is_422_with_the_parse_error(api: Api) -> None:
    headers = AUTH | {"Content-Type": "application/json"}
    response = api.client.post("/approvals/o-1/decision", content=b'{"approved": tru', headers=headers)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("body.")
    assert "JSON decode error" in response.json()["detail"]
    text = api.client.post("/approvals/o-1/decision", content=b"approve", headers=AUTH | {"Content-Type": "text/plain"})
    assert text.status_code == 422
    latin = api.client.post("/approvals/o-1/decision", content=b'{"reviewer": "\xe9"}', headers=headers)
    assert latin.status_code == 422
    assert "UTF-8" in latin.json()["detail"]
    stranger = api.client.post("/approvals/o-1/decision", content=b"\xff", headers={"Content-Type": "application/json"})
    assert stranger.status_code == 401


@pytest.mark.parametrize(
    "url", ["/approvals?status=waiting", "/approvals?limit=0", "/approvals?limit=201", "/approvals?offset=-1",
            "/approvals/bad%20id", "/approvals/" + "x" * 65, "/approvals?page=2", "/approvals/o-1?verbose=1"],
)  # fmt: skip
def test_malformed_queries_and_ids_are_422(api: Api, url: str) -> None:
    response = api.client.get(url, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(("query.", "path."))


# --- the API agrees with the stream side ------------------------------------------------------

MOMENTS = st.sampled_from([timedelta(0), timedelta(minutes=1), DAY - timedelta(microseconds=1), DAY, 2 * DAY])
PRIOR = st.sampled_from(["none", "granted", "denied", "timed_out", "cancelled", "not_charged", "small"])


@settings(max_examples=150, deadline=None)
@given(prior=PRIOR, at=MOMENTS, approved=st.booleans())
def test_every_answer_matches_what_the_stream_side_does(prior: str, at: timedelta, approved: bool) -> None:
    api = Api(now=T0 + at)
    if prior != "not_charged":
        api.harness.feed(PAYMENT_EVENTS, charged("o-1", "5.00" if prior == "small" else "1500.00", T0))
    if prior in ("granted", "denied"):
        api.harness.feed(APPROVAL_DECISIONS, decision("o-1", prior == "granted", "carol", T0))
    if prior == "timed_out":
        api.harness.tick(T0 + DAY)
    if prior == "cancelled":
        api.harness.feed(ORDERS, cancel("o-1"))
    api.sync()
    before = api.harness.state("o-1")
    before = before.model_copy(update={"handled": {}}) if before else None

    response = api.decide("o-1", {"approved": approved, "reviewer": "alice"})
    if response.status_code != 202:
        assert response.status_code == (404 if prior == "not_charged" else 409)
        # The same decision sent straight to the topic is ignored by the stream side.
        outs = api.harness.feed(APPROVAL_DECISIONS, decision("o-1", approved, "alice", api.clock.now))
        assert isinstance(only(outs).data, ApprovalDecisionIgnored)
        after = api.harness.state("o-1")
        assert after is not None
        assert after.model_copy(update={"handled": {}}) == (before or ApprovalState(order_id="o-1"))
        return
    outcome = only(api.deliver()).data
    assert isinstance(outcome, ApprovalGranted if approved else ApprovalDenied)
    assert outcome.reviewer == "alice"

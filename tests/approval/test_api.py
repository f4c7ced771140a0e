"""The reviewer API in process (no broker): its read model fed from the stream app's changelog, a recording publisher.

Decisions the API publishes are fed back into the real stream app, so each answer the API gives
(202 or 409) is checked against what the stream side then does with the decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ByteSize, SecretStr
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.envelope import Source
from schemas.events import ApprovalDecisionIgnored, ApprovalDecisionSubmitted, ApprovalDenied, ApprovalGranted
from schemas.topics import APPROVAL_DECISIONS, ORDERS, PAYMENT_EVENTS
from services.approval.api import create_api
from services.approval.domain import ApprovalState
from services.approval.readmodel import ApprovalsView
from services.approval.settings import DEFAULT_MAX_BODY_BYTES, ApprovalSettings
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

    def __init__(self, now: datetime = T0 + timedelta(minutes=10), **settings: Any) -> None:
        self.harness = Harness(
            ApprovalSettings(_env_file=None, environment="test", approval_token=SecretStr(TOKEN), **settings)
        )
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


# --- the body limit ---------------------------------------------------------------------------

LIMIT = 4096
DECIDE = "/approvals/o-1/decision"
JSON_AUTH = AUTH | {"Content-Type": "application/json"}


class BodyMeter:
    """Counts the body bytes that reach the app behind the limit (the most it ever holds of a body)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.received = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


class Metered(Api):
    """The API with a small body limit and a `BodyMeter` inside it."""

    def __init__(self) -> None:
        super().__init__(approval_http_max_body=ByteSize(LIMIT))
        pending(self.harness, "o-1")
        self.sync()
        # Appended last, it sits inside every middleware create_api added, the limit included.
        self.app.user_middleware.append(Middleware(BodyMeter))

    @property
    def received(self) -> int:
        stack = self.app.middleware_stack
        while stack is not None and not isinstance(stack, BodyMeter):
            stack = getattr(stack, "app", None)
        assert isinstance(stack, BodyMeter), "the meter is not in the middleware stack"
        return stack.received


def padded(size: int) -> bytes:
    """A valid decision of exactly `size` bytes (JSON allows whitespace before the closing brace)."""
    body = json.dumps(APPROVE).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


class Chunks:
    """A chunked body of `total` bytes, recording how much of it was asked for."""

    def __init__(self, total: int, chunk: int = 1024) -> None:
        self.total = total
        self.chunk = chunk
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.sent < self.total:
            piece = b"x" * min(self.chunk, self.total - self.sent)
            self.sent += len(piece)
            yield piece


def test_max_body_defaults_to_64_kib_and_reads_sizes_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ApprovalSettings(_env_file=None).approval_http_max_body == DEFAULT_MAX_BODY_BYTES == 65536
    monkeypatch.setenv("CHOREO_APPROVAL_HTTP_MAX_BODY", "1MiB")
    assert ApprovalSettings(_env_file=None).approval_http_max_body == 1024 * 1024


def test_a_declared_length_over_the_limit_is_413_before_any_of_the_body_is_read() -> None:
    api = Metered()
    response = api.client.post(DECIDE, content=b"x" * (LIMIT + 1), headers=JSON_AUTH)
    assert response.status_code == 413
    assert response.json() == {"detail": f"request body larger than {LIMIT} bytes"}
    assert api.received == 0
    assert api.publisher.published == []


def test_a_chunked_body_over_the_limit_is_cut_at_the_limit_and_answered_413() -> None:
    api = Metered()
    body = Chunks(50 * 1024 * 1024)
    response = api.client.post(DECIDE, content=body, headers=JSON_AUTH)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["detail"] == f"request body larger than {LIMIT} bytes"
    # The app held at most the limit; reading stopped with the chunk that passed it.
    assert 0 < api.received <= LIMIT
    assert body.sent == LIMIT + body.chunk
    assert api.publisher.published == []


def test_a_chunked_body_one_byte_over_the_limit_is_413() -> None:
    api = Metered()
    response = api.client.post(DECIDE, content=Chunks(LIMIT + 1, chunk=LIMIT + 1), headers=JSON_AUTH)
    assert response.status_code == 413
    assert api.received == 0


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_of_exactly_the_limit_is_read_and_decided(chunked: bool) -> None:
    api = Metered()
    body = padded(LIMIT)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    response = api.client.post(DECIDE, content=pieces() if chunked else body, headers=JSON_AUTH)
    assert response.status_code == 202, response.text
    assert api.received == LIMIT
    [published] = api.publisher.published
    assert published.data == ApprovalDecisionSubmitted(approved=True, reviewer="alice", comment="ok")


def test_routes_without_a_body_are_unaffected() -> None:
    api = Metered()
    assert api.client.get("/approvals/o-1", headers=AUTH).status_code == 200
    assert api.client.get("/health").status_code == 200


@contextlib.asynccontextmanager
async def listening(app: FastAPI) -> AsyncIterator[int]:
    """`app` on uvicorn on a free loopback port, configured as the approval process runs it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_config=None, lifespan="off", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await serving
        sock.close()


async def answer_of(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *header_lines = head.decode().strip().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return int(status_line.split()[1]), headers, body


def request_head(method: str, url: str, *headers: str) -> bytes:
    lines = [f"{method} {url} HTTP/1.1", "Host: api.test", f"Authorization: Bearer {TOKEN}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def health_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """The status of GET /health sent on an open connection."""
    writer.write(request_head("GET", "/health"))
    await writer.drain()
    status_code, _headers, _body = await answer_of(reader)
    return status_code


def test_over_a_real_socket_a_declared_50_mb_body_is_refused_from_its_headers() -> None:
    api = Metered()
    size = 50 * 1024 * 1024

    async def scenario() -> None:
        async with listening(api.app) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_head("POST", DECIDE, "Content-Type: application/json", f"Content-Length: {size}"))
            await writer.drain()
            # Not a byte of the body is sent yet: the answer comes from the headers alone.
            status_code, _headers, body = await answer_of(reader)
            assert status_code == 413
            assert json.loads(body) == {"detail": f"request body larger than {LIMIT} bytes"}
            # The body a client sends anyway is discarded, and the connection serves the next request.
            chunk = b"x" * (1024 * 1024)
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
            assert await health_on(reader, writer) == 200
            writer.close()

    asyncio.run(scenario())
    assert api.received == 0
    assert api.publisher.published == []


def test_over_a_real_socket_a_chunked_body_is_answered_413_while_it_streams() -> None:
    api = Metered()
    size = 50 * 1024 * 1024

    async def scenario() -> None:
        async with listening(api.app) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_head("POST", DECIDE, "Content-Type: application/json", "Transfer-Encoding: chunked"))
            answer = asyncio.create_task(answer_of(reader))
            sent = 0
            while not answer.done() and sent < size:
                writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
                sent += 1024
                await writer.drain()
                await asyncio.sleep(0)
            status_code, _headers, _body = await answer
            assert status_code == 413
            assert sent < 1024 * 1024, f"{sent} bytes sent before the answer"
            writer.write(b"0\r\n\r\n")
            assert await health_on(reader, writer) == 200
            writer.close()

    asyncio.run(scenario())
    assert 0 < api.received <= LIMIT
    assert api.publisher.published == []


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

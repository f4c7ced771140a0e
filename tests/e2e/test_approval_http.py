"""The reviewer API over the real broker, with the whole saga running: decisions, deadlines, cancellations, errors.

The API runs in process (ASGI) with its real read model (tailing the approval changelog) and its
real publisher; the services run on the `SagaStack` harness. The last test runs the approval
process itself (`python -m services.approval`) and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from schemas.envelope import Envelope, Source
from schemas.events import (
    Address,
    ApprovalDecisionIgnored,
    ApprovalDecisionSubmitted,
    ApprovalDenied,
    ApprovalGranted,
    OrderCancellationRequested,
    OrderLine,
    OrderPlaced,
)
from services.approval.api import create_api
from services.approval.server import ReviewerApi
from services.approval.settings import ApprovalSettings
from services.common.publisher import publish
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from tests.e2e.harness import TEST_TOKEN, SagaStack, audit_by_order, service_settings, timeline, wait_for_events
from tests.kafka_fixtures import free_port
from tests.support import eventually

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
REPO = Path(__file__).resolve().parents[2]
COMPENSATED = ["PaymentRefunded", "InventoryReleased", "OrderCancelled"]
REQUESTED = ["OrderPlaced", "InventoryReserved", "PaymentCharged", "ApprovalRequested"]


def big_order(order_id: str) -> Envelope:
    """An order at or above the threshold (1,200.00), from a customer of its own so credit never runs out."""
    placed = OrderPlaced(
        customer_id=f"cust-{order_id}",
        items=[OrderLine(sku="WIDGET-1", quantity=10, unit_price=Decimal("120.00"))],
        currency="EUR",
        ship_to=Address(country="DE"),
    )
    return Envelope.new(placed, order_id=order_id, source=Source.CLIENT)


def direct_decision(order_id: str, approved: bool, reviewer: str) -> Envelope:
    """A decision another client publishes straight to approval.decisions."""
    event = ApprovalDecisionSubmitted(approved=approved, reviewer=reviewer, comment="from the topic")
    return Envelope.new(event, order_id=order_id, source=Source.CLIENT)


def approval_settings(base: ChoreoSettings, **overrides: Any) -> ApprovalSettings:
    settings = service_settings("approval", base, **overrides)
    assert isinstance(settings, ApprovalSettings)
    return settings


@dataclass
class Saga:
    stack: SagaStack
    api: ReviewerApi
    http: httpx.AsyncClient
    settings: ChoreoSettings

    def client(self, app: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://reviewer.test", headers=AUTH)

    async def place(self, order_id: str) -> None:
        await publish(self.settings, [big_order(order_id)])

    async def pending(self, order_id: str) -> dict[str, Any]:
        """Place a large order; its approval once the API shows it pending."""
        await self.place(order_id)

        async def shown() -> httpx.Response:
            return await self.http.get(f"/approvals/{order_id}")

        response = await eventually(shown, lambda r: r.status_code == 200, timeout=60)
        body: dict[str, Any] = response.json()
        assert body["status"] == "pending"
        return body

    async def decide(self, order_id: str, approved: bool, reviewer: str = "alice", **extra: Any) -> httpx.Response:
        body = {"approved": approved, "reviewer": reviewer, "comment": extra.get("comment")}
        return await self.http.post(f"/approvals/{order_id}/decision", json=body)

    async def status_of(self, order_id: str, wanted: str) -> dict[str, Any]:
        async def shown() -> dict[str, Any]:
            body: dict[str, Any] = (await self.http.get(f"/approvals/{order_id}")).json()
            return body

        return await eventually(shown, lambda body: body.get("status") == wanted, timeout=30)


@contextlib.asynccontextmanager
async def saga(base: ChoreoSettings, *, timeout: float = 3600) -> AsyncIterator[Saga]:
    """Every service running, and the reviewer API over the real changelog and broker."""
    async with SagaStack(base, {"approval": {"approval_timeout": timeout}}) as stack:
        await stack.start()
        api = ReviewerApi(approval_settings(base, approval_timeout=timeout))
        await api.start()
        try:
            await asyncio.wait_for(api.view.wait_caught_up(), 30)
            transport = httpx.ASGITransport(app=api.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://reviewer.test", headers=AUTH) as http:
                yield Saga(stack, api, http, base)
        finally:
            await api.stop()


def in_order(seen: list[str], expected: list[str]) -> None:
    """The same events; in order, except the client's decision, whose place beside other topics' events may vary."""
    assert Counter(seen) == Counter(expected), seen
    decided = "ApprovalDecisionSubmitted"
    assert [e for e in seen if e != decided] == [e for e in expected if e != decided], seen


async def envelopes(settings: ChoreoSettings, order_id: str) -> list[Envelope]:
    return (await audit_by_order(settings)).get(order_id, [])


# --- outcomes ---------------------------------------------------------------------------------


async def test_grant_through_the_api_completes_the_order_and_records_the_reviewer(
    choreo_settings: ChoreoSettings,
) -> None:
    async with saga(choreo_settings) as s:
        shown = await s.pending("o-grant")
        assert (shown["amount"], shown["currency"], shown["customer_id"]) == ("1200.00", "EUR", "cust-o-grant")
        assert shown["items"] == [{"sku": "WIDGET-1", "quantity": 10, "unit_price": "120.00"}]

        response = await s.decide("o-grant", True, "alice", comment="known customer")

        assert response.status_code == 202
        decision_id = response.json()["decision_event_id"]
        seen = await wait_for_events(choreo_settings, "o-grant", "OrderCompleted")
        in_order(seen, [*REQUESTED, "ApprovalDecisionSubmitted", "ApprovalGranted", "ShipmentScheduled",
                        "OrderCompleted"])  # fmt: skip
        by_type = {e.type: e for e in await envelopes(choreo_settings, "o-grant")}
        submitted, granted = by_type["ApprovalDecisionSubmitted"], by_type["ApprovalGranted"]
        assert str(submitted.event_id) == decision_id
        assert submitted.source is Source.APPROVAL
        assert submitted.data == ApprovalDecisionSubmitted(approved=True, reviewer="alice", comment="known customer")
        assert isinstance(granted.data, ApprovalGranted)
        assert (granted.data.reviewer, granted.data.comment, granted.causation_id) == (
            "alice",
            "known customer",
            submitted.event_id,
        )
        closed = await s.status_of("o-grant", "granted")
        assert (closed["reviewer"], closed["decision_event_id"]) == ("alice", decision_id)


async def test_deny_through_the_api_compensates(choreo_settings: ChoreoSettings) -> None:
    async with saga(choreo_settings) as s:
        await s.pending("o-deny")

        assert (await s.decide("o-deny", False, "bob", comment="suspicious")).status_code == 202

        seen = await wait_for_events(choreo_settings, "o-deny", "OrderCancelled")
        in_order(seen, [*REQUESTED, "ApprovalDecisionSubmitted", "ApprovalDenied", *COMPENSATED])
        denied = next(e for e in await envelopes(choreo_settings, "o-deny") if e.type == "ApprovalDenied")
        assert denied.data == ApprovalDenied(reviewer="bob", comment="suspicious")
        assert (await s.status_of("o-deny", "denied"))["reviewer"] == "bob"
        listed = (await s.http.get("/approvals", params={"status": "denied"})).json()
        assert [item["order_id"] for item in listed["items"]] == ["o-deny"]


async def test_timeout_compensates_and_a_late_decision_is_409(choreo_settings: ChoreoSettings) -> None:
    async with saga(choreo_settings, timeout=2) as s:
        await s.pending("o-late")

        seen = await wait_for_events(choreo_settings, "o-late", "OrderCancelled")
        assert seen == [*REQUESTED, "ApprovalEscalated", "ApprovalTimedOut", *COMPENSATED]
        await s.status_of("o-late", "timed_out")

        late = await s.decide("o-late", True)
        assert late.status_code == 409
        assert late.json()["detail"] == "order o-late: the approval timed out"
        await s.stack.settle()
        assert await timeline(choreo_settings, "o-late") == seen  # nothing published, nothing granted


async def test_a_decision_past_the_deadline_is_409_even_before_the_timer_fires(
    choreo_settings: ChoreoSettings,
) -> None:
    async with saga(choreo_settings) as s:
        await s.pending("o-past")
        skewed = create_api(s.api.settings, s.api.view, s.api.publisher, lambda: datetime.now(UTC) + timedelta(hours=2))
        async with s.client(skewed) as later:
            response = await later.post("/approvals/o-past/decision", json={"approved": True, "reviewer": "alice"})
        assert response.status_code == 409
        assert "submitted after the deadline" in response.json()["detail"]
        # In time, the same decision is accepted.
        assert (await s.decide("o-past", True)).status_code == 202
        await wait_for_events(choreo_settings, "o-past", "OrderCompleted")


async def test_a_deadline_passed_while_approval_was_down_fires_once_on_restart(
    choreo_settings: ChoreoSettings,
) -> None:
    async with saga(choreo_settings, timeout=4) as s:
        await s.pending("o-down")
        await s.stack.stop("approval")
        down_at = time.monotonic()
        deadline = datetime.fromisoformat((await s.http.get("/approvals/o-down")).json()["deadline"])
        await asyncio.sleep(max(0.0, (deadline - datetime.now(UTC)).total_seconds()) + 2)
        assert "ApprovalTimedOut" not in await timeline(choreo_settings, "o-down")

        await s.stack.start("approval")

        seen = await wait_for_events(choreo_settings, "o-down", "OrderCancelled")
        assert time.monotonic() - down_at > 4
        await s.stack.settle()
        seen = await timeline(choreo_settings, "o-down")
        assert seen.count("ApprovalTimedOut") == 1
        assert seen[: len(REQUESTED)] == REQUESTED
        assert seen[-4:] == ["ApprovalTimedOut", *COMPENSATED]
        assert (await s.decide("o-down", True)).status_code == 409


# --- who decides first -------------------------------------------------------------------------


async def test_a_second_decision_is_409_while_the_first_is_processed_and_after(
    choreo_settings: ChoreoSettings,
) -> None:
    async with saga(choreo_settings) as s:
        await s.pending("o-twice")

        first = await s.decide("o-twice", True, "alice")
        second = await s.decide("o-twice", False, "bob")

        assert first.status_code == 202
        assert second.status_code == 409
        await wait_for_events(choreo_settings, "o-twice", "OrderCompleted")
        await s.status_of("o-twice", "granted")
        again = await s.decide("o-twice", False, "bob")
        assert again.status_code == 409
        assert again.json()["detail"] == "order o-twice: the approval was already granted by alice"
        await s.stack.settle()
        assert (await timeline(choreo_settings, "o-twice")).count("ApprovalDecisionSubmitted") == 1


async def test_two_api_instances_racing_are_settled_by_the_stream_side(choreo_settings: ChoreoSettings) -> None:
    async with saga(choreo_settings) as s:
        other = ReviewerApi(s.api.settings)
        await other.start()
        try:
            await asyncio.wait_for(other.view.wait_caught_up(), 30)
            await s.pending("o-race")
            async with s.client(other.app) as http_b:
                await eventually(lambda: http_b.get("/approvals/o-race"), lambda r: r.status_code == 200)
                a, b = await asyncio.gather(
                    s.decide("o-race", True, "alice"),
                    http_b.post("/approvals/o-race/decision", json={"approved": False, "reviewer": "bob"}),
                )
        finally:
            await other.stop()
        accepted = [r for r in (a, b) if r.status_code == 202]
        assert accepted
        assert all(r.status_code in (202, 409) for r in (a, b))
        await wait_for_events(choreo_settings, "o-race", "ApprovalRequested")
        # Audit merges several topics, so the second decision's outcome may land after the order finished.
        outcomes = ("ApprovalGranted", "ApprovalDenied", "ApprovalDecisionIgnored")
        seen = await eventually(
            lambda: timeline(choreo_settings, "o-race"),
            lambda t: (
                t.count("ApprovalDecisionSubmitted") == len(accepted)
                and ("OrderCompleted" in t or "OrderCancelled" in t)
                and sum(t.count(e) for e in outcomes) >= len(accepted)
            ),
            timeout=60,
        )
        assert seen.count("ApprovalGranted") + seen.count("ApprovalDenied") == 1
        assert seen.count("ApprovalDecisionIgnored") == len(accepted) - 1


async def test_decisions_straight_to_the_topic_count_when_first_and_are_ignored_after(
    choreo_settings: ChoreoSettings,
) -> None:
    async with saga(choreo_settings) as s:
        await s.pending("o-topic")
        first = direct_decision("o-topic", True, "carol")

        await publish(choreo_settings, [first])

        await wait_for_events(choreo_settings, "o-topic", "ApprovalGranted")
        closed = await s.status_of("o-topic", "granted")
        assert (closed["reviewer"], closed["decision_event_id"]) == ("carol", str(first.event_id))
        refused = await s.decide("o-topic", False, "bob")
        assert refused.status_code == 409
        assert refused.json()["detail"] == "order o-topic: the approval was already granted by carol"

        second = direct_decision("o-topic", False, "dave")
        await publish(choreo_settings, [second])

        seen = await wait_for_events(choreo_settings, "o-topic", "OrderCompleted", "ApprovalDecisionIgnored")
        ignored = next(e for e in await envelopes(choreo_settings, "o-topic") if e.type == "ApprovalDecisionIgnored")
        assert ignored.data == ApprovalDecisionIgnored(
            decision_event_id=str(second.event_id), reviewer="dave", reason="the approval was already granted by carol"
        )
        assert ignored.causation_id == second.event_id
        assert "ApprovalDenied" not in seen
        assert seen.count("ApprovalGranted") == 1


async def test_cancellation_while_pending_closes_the_approval(choreo_settings: ChoreoSettings) -> None:
    async with saga(choreo_settings) as s:
        await s.pending("o-cancel")
        cancel = OrderCancellationRequested(reason="customer changed their mind")

        await publish(choreo_settings, [Envelope.new(cancel, order_id="o-cancel", source=Source.CLIENT)])

        await wait_for_events(choreo_settings, "o-cancel", "OrderCancelled")
        closed = await s.status_of("o-cancel", "cancelled")
        assert closed["order_cancelled"] is True
        refused = await s.decide("o-cancel", True)
        assert refused.status_code == 409
        assert refused.json()["detail"] == "order o-cancel: the order was cancelled"
        pending = (await s.http.get("/approvals", params={"status": "pending"})).json()
        assert "o-cancel" not in [item["order_id"] for item in pending["items"]]
        await s.stack.settle()
        seen = await timeline(choreo_settings, "o-cancel")
        assert not {"ApprovalGranted", "ApprovalDenied", "ApprovalTimedOut", "ApprovalDecisionSubmitted"} & set(seen)


# --- errors -----------------------------------------------------------------------------------


async def test_401_404_and_422(choreo_settings: ChoreoSettings) -> None:
    async with saga(choreo_settings) as s:
        await s.pending("o-errors")
        async with s.client(s.api.app) as http:
            for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-token"}):
                for response in (
                    await http.get("/approvals", headers=headers),
                    await http.get("/approvals/o-errors", headers=headers),
                    await http.post("/approvals/o-errors/decision", json={"approved": True, "reviewer": "x"},
                                    headers=headers),
                ):  # fmt: skip
                    assert response.status_code == 401
                    assert response.json()["detail"] in (
                        "missing bearer token: send Authorization: Bearer <token>",
                        "invalid bearer token",
                    )

        unknown = await s.decide("o-nobody-placed", True)
        assert unknown.status_code == 404
        assert unknown.json()["detail"] == "order o-nobody-placed: no approval has been requested for this order"
        assert (await s.http.get("/approvals/o-nobody-placed")).status_code == 404

        for body in ({"approved": "yes", "reviewer": "alice"}, {"approved": True}, {"approved": True, "reviewer": ""}):
            malformed = await s.http.post("/approvals/o-errors/decision", json=body)
            assert malformed.status_code == 422
            assert malformed.json()["detail"].startswith("body.")
        not_json = await s.http.post(
            "/approvals/o-errors/decision", content=b"{", headers={"Content-Type": "application/json"}
        )
        assert not_json.status_code == 422
        assert (await s.http.get("/approvals", params={"status": "everything"})).status_code == 422
        # None of it reached the topic: the approval is still pending.
        await s.stack.settle()
        assert (await s.http.get("/approvals/o-errors")).json()["status"] == "pending"
        assert "ApprovalDecisionSubmitted" not in await timeline(choreo_settings, "o-errors")


# --- the process ------------------------------------------------------------------------------


async def test_the_process_serves_the_api_beside_the_stream_and_stops_on_sigterm(
    choreo_settings: ChoreoSettings, tmp_path: Path
) -> None:
    await ensure_topics(choreo_settings)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHOREO_")}
    env.update({
        "CHOREO_BOOTSTRAP_SERVERS": choreo_settings.bootstrap_servers,
        "CHOREO_TOPIC_PREFIX": choreo_settings.topic_prefix,
        "CHOREO_PARTITIONS": str(choreo_settings.partitions),
        "CHOREO_ENVIRONMENT": "test",
        "CHOREO_APPROVAL_TOKEN": TEST_TOKEN,
        "CHOREO_APPROVAL_HTTP_PORT": str(port),
        "CHOREO_HEALTH_PORT": "0",
    })  # fmt: skip
    log_path = tmp_path / "approval.log"
    with open(log_path, "wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.approval", cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as http:

            async def health() -> int:
                try:
                    return (await http.get("/health")).status_code
                except httpx.TransportError:
                    return 0

            await eventually(health, lambda code: code == 200, timeout=60)
            body = (await http.get("/health")).json()
            assert body["status"] == "ok"
            assert body["checks"]["stream"]["service"] == "approval"
            assert (await http.get("/approvals")).status_code == 200
            assert (await http.get("/approvals", headers={"Authorization": "Bearer nope"})).status_code == 401
            assert "Pending approvals" in (await http.get("/")).text

        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = log_path.read_text()
    assert code == 0, output
    assert '"message": "service stopped"' in output
    assert "Traceback" not in output

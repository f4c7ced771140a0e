"""One order, one trace: every service's spans for a reviewed order share the client's trace id, and each hop's
span is the child of the span that wrote the record it read (the services in process, on the real broker)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from schemas.topics import (
    APPROVAL_STATE,
    AUDIT,
    AUDIT_STATE,
    INTERNAL_TOPICS,
    INVENTORY_STATE,
    PAYMENT_STATE,
    SAGA_TOPICS,
    SHIPPING_STATE,
)
from services.approval.domain import ApprovalStatus
from services.approval.server import ReviewerApi
from services.cli.publish_cmd import CLIENT_SERVICE
from services.common.publisher import publish
from services.common.settings import ChoreoSettings
from services.common.tracing import TRACEPARENT
from tests.e2e.harness import SAGA_SERVICES, TEST_TOKEN, SagaStack, wait_for_events
from tests.e2e.test_approval_http import approval_settings, big_order
from tests.support import eventually, read_topic

ORDER_ID = "o-traced"
CHANGELOGS = (INVENTORY_STATE, PAYMENT_STATE, APPROVAL_STATE, SHIPPING_STATE, AUDIT_STATE)
# Requests and replies between two stages of a service (those not handed over in process).
EXCHANGES = tuple(topic for topic in INTERNAL_TOPICS if not topic.compacted)
# The reviewer's own tooling traced the request: the decision links to it but stays in the order's trace.
CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
DECISION_SPAN = "POST /approvals/{order_id}/decision"


def recording(service: str, exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def service_of(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def traceparent_ids(headers: Any) -> tuple[int, int] | None:
    """(trace id, span id) of a record's traceparent header."""
    for name, value in headers or ():
        if name == TRACEPARENT:
            _version, trace_id, span_id, _flags = value.decode().split("-")
            return int(trace_id, 16), int(span_id, 16)
    return None


async def test_a_reviewed_order_is_one_trace_with_each_hop_under_the_span_that_wrote_its_input(
    choreo_settings: ChoreoSettings,
) -> None:
    exporter = InMemorySpanExporter()
    providers = {name: recording(name, exporter) for name in (*SAGA_SERVICES, CLIENT_SERVICE)}
    overrides: dict[str, dict[str, Any]] = {"approval": {"approval_timeout": 3600}}
    async with SagaStack(choreo_settings, overrides, tracer_providers=providers) as stack:
        await stack.start()
        api = ReviewerApi(approval_settings(choreo_settings), tracer_provider=providers["approval"])
        await api.start()
        try:
            # Given a client places an order over the threshold
            await publish(choreo_settings, [big_order(ORDER_ID)], tracer_provider=providers[CLIENT_SERVICE])
            await eventually(
                lambda: asyncio.sleep(0, api.view.get(ORDER_ID)),
                lambda state: state is not None and state.status is ApprovalStatus.PENDING,
                timeout=60,
            )
            # When a reviewer approves it over HTTP
            transport = httpx.ASGITransport(app=api.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://reviewer.test") as client:
                response = await client.post(
                    f"/approvals/{ORDER_ID}/decision",
                    json={"approved": True, "reviewer": "alice"},
                    headers={
                        "Authorization": f"Bearer {TEST_TOKEN}",
                        TRACEPARENT: f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01",
                    },
                )
            assert response.status_code == 202, response.text
            # And the saga ends
            await wait_for_events(choreo_settings, ORDER_ID, "OrderCompleted")
            await stack.settle()
        finally:
            await api.stop()

    spans = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans}
    [root] = [span for span in spans if service_of(span) == CLIENT_SERVICE]
    trace_id = root.context.trace_id

    # Then the client's publish span is the root of the order's trace
    assert root.kind is SpanKind.PRODUCER
    assert root.parent is None
    # And every span about the order, in every service, is in that one trace
    ordered = [span for span in spans if (span.attributes or {}).get("choreo.order_id") == ORDER_ID]
    assert {span.context.trace_id for span in ordered} == {trace_id}
    in_trace = [span for span in spans if span.context.trace_id == trace_id]
    assert {service_of(span) for span in in_trace} == {CLIENT_SERVICE, *SAGA_SERVICES}
    # And no span of the trace has a parent outside it: the tree is whole
    for span in in_trace:
        assert span is root or parent_id(span) in by_id, span.name

    # And each hop read from a topic is the child of the span whose traceparent its input record carries
    records = {
        (record.topic, record.partition, record.offset): record
        for topic in (*SAGA_TOPICS, AUDIT, *EXCHANGES)
        for record in await read_topic(choreo_settings, topic)
    }
    hops = [span for span in in_trace if span.kind is SpanKind.CONSUMER]
    read = [span for span in hops if "messaging.kafka.offset" in (span.attributes or {})]
    assert read
    for span in read:
        attributes = span.attributes or {}
        key = (
            attributes["messaging.destination.name"],
            int(str(attributes["messaging.destination.partition.id"])),
            attributes["messaging.kafka.offset"],
        )
        assert traceparent_ids(records[key].headers) == (trace_id, parent_id(span)), span.name
    # A request handed over in process has its parent in the service that handed it over
    for span in hops:
        if (span.attributes or {}).get("choreo.in_process"):
            parent = by_id[parent_id(span) or 0]
            assert service_of(parent) == service_of(span), span.name

    # The first hop's parent is the client's span
    [placed] = [span for span in hops if span.name == "inventory process orders"]
    assert parent_id(placed) == root.context.span_id
    # The reviewer's decision span is in the trace, under the span that wrote the charge which made the
    # approval pending, with the caller's own span only linked
    [decision] = [span for span in in_trace if span.name == DECISION_SPAN]
    assert decision.kind is SpanKind.SERVER
    assert service_of(decision) == "approval"
    assert service_of(by_id[parent_id(decision) or 0]) == "payment"
    assert [(link.context.trace_id, link.context.span_id) for link in decision.links] == [
        (int(CALLER_TRACE_ID, 16), int(CALLER_SPAN_ID, 16))
    ]
    assert (decision.attributes or {})["http.response.status_code"] == 202
    # And the stream side rules on the decision in a child of the HTTP span
    [ruled] = [span for span in hops if span.name == "approval process approval.decisions"]
    assert parent_id(ruled) == decision.context.span_id
    # Every service took part: each one's processing spans are in the trace
    assert set(Counter(service_of(span) for span in hops)) == set(SAGA_SERVICES)

    # The changelogs carry state, not steps of the saga: no trace context on them
    for changelog in CHANGELOGS:
        stored = await read_topic(choreo_settings, changelog)
        assert stored, changelog.name
        assert all(traceparent_ids(record.headers) is None for record in stored), changelog.name
    # While every record on the saga, audit and request/reply topics carries one, in this order's trace
    for record in records.values():
        ids = traceparent_ids(record.headers)
        assert ids is not None, (record.topic, record.value, record.headers)
        assert ids[0] == trace_id

"""Trace context on records and the runner's spans, without a broker: headers in and out, a span per record,
timers, export off (nothing recorded, the trace kept), export on over OTLP/HTTP, and the log fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import timedelta

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas.topics import AUDIT, DEAD_LETTER, ORDERS, PAYMENT_EVENTS, SHIPPING_EVENTS, STOCK_REQUESTS
from services.cli.publish_cmd import CLIENT_SERVICE
from services.common.logs import ORDER_ID, JsonFormatter, TraceContextFilter
from services.common.processor import IN_PROCESS_OFFSET, Incoming, TaskContext
from services.common.settings import ChoreoSettings
from services.common.state import KeyedStore
from services.common.topics import ensure_topics
from services.common.tracing import (
    OTLP_ENDPOINT_ENV,
    OTLP_TRACES_ENDPOINT_ENV,
    TRACE_HEADERS,
    TRACEPARENT,
    TRACESTATE,
    PropagatingTracer,
    PropagatingTracerProvider,
    Tracing,
    extract,
    remote_parent,
    trace_headers,
    traceparent_of,
    tracer_provider,
    with_trace,
)
from tests.approval.support import DAY, T0, charged
from tests.approval.support import Harness as ApprovalHarness
from tests.otlp_collector import Collector, otlp_collector
from tests.payment.harness import T0 as PAYMENT_T0
from tests.payment.harness import FlakyRefunds, details, reserved, shipping_failed
from tests.payment.harness import Harness as PaymentHarness
from tests.support import choreo, read_topic

SETTINGS = ChoreoSettings(_env_file=None, environment="test", topic_prefix="p.")
CE_TYPE_HEADER = ("ce_type", b"OrderPlaced")


def recording(service: str = "svc") -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def task(tracing: Tracing) -> TaskContext:
    return TaskContext(0, SETTINGS, "svc", KeyedStore(), tracing=tracing)


def record(headers: tuple[tuple[str, bytes], ...] = (), *, key: bytes = b"o-1", offset: int = 7) -> Incoming:
    return Incoming(ORDERS, 0, offset, key, b"{}", 0, headers)


def parent_span(provider: TracerProvider) -> trace.Span:
    return provider.get_tracer("test").start_span("client publish", kind=SpanKind.PRODUCER)


def process(
    tracing: Tracing, context: TaskContext, message: Incoming, emit: int = 1, *, dead_letter: bool = False
) -> None:
    """What the runner does around a handler: open the span, let the handler write, stamp and close."""
    sent = len(context.outbox)
    traced = tracing.processing(context, message)
    for index in range(emit):
        context.send(AUDIT, f"o-{index}", b"out")
    if dead_letter:
        context.dead_letter(message, "bad")
    tracing.finished(traced, context, sent)


def only(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    [span] = [span for span in exporter.get_finished_spans() if span.name == name]
    return span


# --- headers ----------------------------------------------------------------------------------------


def test_trace_headers_round_trip_through_record_headers() -> None:
    provider, _ = recording()
    span = parent_span(provider)
    headers = (CE_TYPE_HEADER, *trace_headers(span))
    extracted = trace.get_current_span(extract(headers)).get_span_context()
    assert (extracted.trace_id, extracted.span_id) == (
        span.get_span_context().trace_id,
        span.get_span_context().span_id,
    )
    assert extracted.is_remote
    assert traceparent_of(headers) == dict(headers)[TRACEPARENT].decode()


def test_tracestate_is_carried_on_when_present() -> None:
    provider, _ = recording()
    incoming = (
        (TRACEPARENT, b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        (TRACESTATE, b"vendor=opaque"),
    )
    span = provider.get_tracer("test").start_span("hop", context=extract(incoming))
    assert dict(trace_headers(span))[TRACESTATE] == b"vendor=opaque"


def test_new_trace_headers_replace_old_ones_and_keep_the_rest() -> None:
    old = (CE_TYPE_HEADER, (TRACEPARENT, b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"))
    new = ((TRACEPARENT, b"00-11111111111111111111111111111111-2222222222222222-01"),)
    assert with_trace(old, new) == (CE_TYPE_HEADER, *new)


VALID = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    "value",
    [
        VALID,
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        b"00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
        b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
        b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future",
        b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        b"00-0af7651916cd43dd8448eb211c8031_c-b7ad6b7169203331-01",
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        b" 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        b"not a traceparent",
    ],
)
def test_reading_a_traceparent_agrees_with_the_w3c_propagator(value: bytes) -> None:
    headers = ((TRACEPARENT, value), (TRACESTATE, b"vendor=opaque"))
    ours = trace.get_current_span(extract(headers)).get_span_context()
    theirs = trace.get_current_span(
        TraceContextTextMapPropagator().extract({TRACEPARENT: value.decode(), TRACESTATE: "vendor=opaque"})
    ).get_span_context()
    assert ours == theirs
    assert (remote_parent(headers) is not None) == theirs.is_valid


def test_two_traceparents_are_both_ignored() -> None:
    assert remote_parent(((TRACEPARENT, VALID), (TRACEPARENT, VALID))) is None


def test_a_record_without_trace_context_starts_no_trace() -> None:
    assert not trace.get_current_span(extract((CE_TYPE_HEADER,))).get_span_context().is_valid


# --- the runner's spans --------------------------------------------------------------------------


def test_a_record_is_processed_in_a_child_of_the_span_that_wrote_it_and_its_outputs_carry_it_on() -> None:
    provider, exporter = recording()
    tracing = Tracing(provider)
    context = task(tracing)
    context.send(AUDIT, "earlier", b"written before")  # by an earlier record: not this span's
    client = parent_span(provider)
    message = record((CE_TYPE_HEADER, *trace_headers(client)))
    seen: list[tuple[str | None, trace.Span]] = []

    sent = len(context.outbox)
    traced = tracing.processing(context, message)
    seen.append((ORDER_ID.get(), trace.get_current_span()))
    context.send(AUDIT, "o-1", b"out")
    context.dead_letter(message, "bad")
    tracing.finished(traced, context, sent)

    span = only(exporter, "svc process orders")
    assert span.parent is not None
    assert span.parent.span_id == client.get_span_context().span_id
    assert span.context.trace_id == client.get_span_context().trace_id
    assert span.kind is SpanKind.CONSUMER
    assert dict(span.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": "p.orders",
        "messaging.destination.partition.id": "0",
        "messaging.consumer.group.name": SETTINGS.group("svc"),
        "messaging.kafka.offset": 7,
        "choreo.order_id": "o-1",
    }
    assert span.status.status_code is StatusCode.ERROR  # it dead-lettered
    # While processing, the span was current and the order named; afterwards neither.
    assert seen == [("o-1", seen[0][1])]
    assert seen[0][1].get_span_context().span_id == span.context.span_id
    assert ORDER_ID.get() is None
    assert not trace.get_current_span().get_span_context().is_valid
    # Every record it wrote, dead letter included, names it as their parent; the earlier one is untouched.
    earlier, output, dead = context.outbox
    assert earlier.headers == ()
    expected = trace_headers(NonRecordingSpan(span.context))
    assert output.headers == expected
    assert dead.topic == SETTINGS.topic(DEAD_LETTER)
    # (a dead letter keeps the original's other headers and adds its origin's; its trace context is new)
    assert tuple(header for header in dead.headers if header[0] in TRACE_HEADERS) == expected


def test_a_record_without_trace_context_is_processed_in_a_new_root() -> None:
    provider, exporter = recording()
    tracing = Tracing(provider)
    process(tracing, task(tracing), record((CE_TYPE_HEADER,)))
    span = only(exporter, "svc process orders")
    assert span.parent is None
    assert span.status.status_code is StatusCode.UNSET


def test_a_record_handed_over_in_process_names_no_offset_and_no_order_when_keyed_otherwise() -> None:
    provider, exporter = recording()
    tracing = Tracing(provider)
    message = Incoming(STOCK_REQUESTS, 0, IN_PROCESS_OFFSET, b"sku-1", b"{}", 0, ())
    process(tracing, task(tracing), message)
    attributes = dict(only(exporter, "svc process inventory.stock-requests").attributes or {})
    assert attributes["choreo.in_process"] is True
    assert "messaging.kafka.offset" not in attributes
    assert "choreo.order_id" not in attributes


def test_a_timer_joins_the_trace_its_order_kept() -> None:
    provider, exporter = recording()
    tracing = Tracing(provider)
    context = task(tracing)
    started_by = parent_span(provider)
    stored = dict(trace_headers(started_by))[TRACEPARENT].decode()
    with tracing.timer(context, "o-1", stored):
        assert ORDER_ID.get() == "o-1"
        context.send(AUDIT, "o-1", b"timed out")
    with tracing.timer(context, "o-2", None):
        context.send(AUDIT, "o-2", b"timed out")
    first, second = exporter.get_finished_spans()
    assert first.name == "svc timer"
    assert first.parent is not None
    assert first.parent.span_id == started_by.get_span_context().span_id
    assert second.parent is None
    assert [out.headers for out in context.outbox] == [
        trace_headers(NonRecordingSpan(first.context)),
        trace_headers(NonRecordingSpan(second.context)),
    ]
    assert ORDER_ID.get() is None


def trace_id_of(headers: tuple[tuple[str, bytes], ...]) -> str | None:
    found = traceparent_of(headers)
    return found.split("-")[1] if found is not None else None


def test_approval_timers_join_the_trace_of_the_charge_that_made_the_approval_pending() -> None:
    # Given an approval made pending by a charge that carried a trace
    approval = ApprovalHarness()
    charge = charged("o-1", "1500.00", T0)
    approval.feed_raw(PAYMENT_EVENTS, charge.key, charge.to_bytes(), approval.partition("o-1"), (
        *charge.headers(), (TRACEPARENT, VALID),
    ))  # fmt: skip
    state = approval.state("o-1")
    assert state is not None
    assert state.traceparent == VALID.decode()
    # When its deadline passes
    [timed_out] = approval.tick(T0 + DAY)
    # Then the timeout is in the charge's trace
    assert timed_out.envelope is not None
    assert timed_out.envelope.type == "ApprovalTimedOut"
    assert trace_id_of(timed_out.headers) == trace_id_of(((TRACEPARENT, VALID),))


def test_refund_retries_join_the_trace_of_the_record_whose_refund_failed() -> None:
    # Given a charged order whose refund fails once when shipping fails, in a traced record
    payment = PaymentHarness(refunds=FlakyRefunds(failures=1))
    payment.publish(reserved("o-1", details("alice", "40.00")))
    payment.pump()
    failed = shipping_failed("o-1")
    payment.deliver(SHIPPING_EVENTS, failed.key, failed.to_bytes(), headers=(*failed.headers(), (TRACEPARENT, VALID)))
    state = payment.order("o-1")
    assert state is not None
    assert state.traceparent == VALID.decode()
    # When the retry is due
    retried = payment.tick(PAYMENT_T0 + timedelta(minutes=1))
    # Then what the retry writes is in that trace
    assert retried
    assert {trace_id_of(out.headers) for out in retried} == {trace_id_of(((TRACEPARENT, VALID),))}


# --- export off ------------------------------------------------------------------------------------


def test_export_off_records_nothing_but_keeps_the_trace_with_a_fresh_span_id_per_hop() -> None:
    tracing = Tracing(PropagatingTracerProvider())
    client = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers: tuple[tuple[str, bytes], ...] = ((TRACEPARENT, client.encode()),)
    span_ids = [client.split("-")[2]]
    for hop in range(3):
        context = task(tracing)
        traced = tracing.processing(context, record(headers))
        assert not trace.get_current_span().is_recording()  # no span is recorded, nor even built
        context.send(AUDIT, "o-1", f"hop {hop}".encode())
        tracing.finished(traced, context, 0)
        headers = context.outbox[0].headers
        version, trace_id, span_id, flags = dict(headers)[TRACEPARENT].decode().split("-")
        assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
        span_ids.append(span_id)
    assert len(set(span_ids)) == len(span_ids)


@pytest.mark.parametrize(
    "headers",
    [
        ((TRACEPARENT, VALID), (TRACESTATE, b"vendor=opaque")),
        ((TRACEPARENT, b"00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01"),),
        ((TRACEPARENT, b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future"),),
        ((TRACEPARENT, VALID), (TRACEPARENT, VALID)),
        ((TRACEPARENT, b"00-00000000000000000000000000000000-b7ad6b7169203331-01"),),
    ],
    ids=["plain", "uppercase", "future-version", "two-traceparents", "zero-trace-id"],
)
def test_export_off_writes_what_the_propagating_tracer_would(headers: tuple[tuple[str, bytes], ...]) -> None:
    # The runner rewrites a plain header straight from its bytes; anything else goes through the tracer
    tracing = Tracing(PropagatingTracerProvider())
    context = task(tracing)
    process(tracing, context, record(headers))
    written = dict(context.outbox[0].headers)
    expected = dict(trace_headers(PropagatingTracer().start_span("hop", context=extract(headers))))
    assert written.keys() == expected.keys()
    ours, theirs = written[TRACEPARENT].split(b"-"), expected[TRACEPARENT].split(b"-")
    parent = remote_parent(headers)
    if parent is not None:
        assert ours[1] == theirs[1] == b"%032x" % parent.trace_id  # the trace goes on
    else:
        assert ours[1] != theirs[1]  # a new trace each
    assert (ours[0], ours[3]) == (theirs[0], theirs[3])
    assert written.get(TRACESTATE) == expected.get(TRACESTATE)


def test_export_off_a_timer_builds_no_recording_span_and_keeps_the_stored_trace() -> None:
    tracing = Tracing(PropagatingTracerProvider())
    context = task(tracing)
    with tracing.timer(context, "o-1", VALID.decode()) as span:
        assert isinstance(span, NonRecordingSpan)
        assert not span.is_recording()
        context.send(AUDIT, "o-1", b"timed out")
    _version, trace_id, span_id, _flags = dict(context.outbox[0].headers)[TRACEPARENT].split(b"-")
    assert trace_id == VALID.split(b"-")[1]
    assert span_id != VALID.split(b"-")[2]


def test_export_off_starts_a_sampled_trace_for_a_record_without_one() -> None:
    tracing = Tracing(PropagatingTracerProvider())
    context = task(tracing)
    process(tracing, context, record(()))
    _version, trace_id, _span_id, flags = dict(context.outbox[0].headers)[TRACEPARENT].decode().split("-")
    assert int(trace_id, 16) != 0
    assert flags == "01"


def test_without_an_endpoint_the_process_exports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OTLP_ENDPOINT_ENV, raising=False)
    monkeypatch.delenv(OTLP_TRACES_ENDPOINT_ENV, raising=False)
    assert isinstance(tracer_provider("svc"), PropagatingTracerProvider)


# --- export on ---------------------------------------------------------------------------------------


@pytest.fixture
def collector() -> Iterator[Collector]:
    with otlp_collector() as running:
        yield running


def test_with_an_endpoint_spans_arrive_over_otlp_http(monkeypatch: pytest.MonkeyPatch, collector: Collector) -> None:
    endpoint, posts = collector.endpoint, collector.posts
    monkeypatch.delenv(OTLP_TRACES_ENDPOINT_ENV, raising=False)
    monkeypatch.setenv(OTLP_ENDPOINT_ENV, endpoint)
    provider = tracer_provider("inventory")
    assert isinstance(provider, TracerProvider)
    tracing = Tracing(provider)
    process(tracing, task(tracing), record(()))
    assert provider.force_flush(10_000)
    provider.shutdown()
    assert [path for path, _ in posts] == ["/v1/traces"]
    request = ExportTraceServiceRequest.FromString(posts[0][1])
    [resource_spans] = request.resource_spans
    resource = {attribute.key: attribute.value.string_value for attribute in resource_spans.resource.attributes}
    assert resource["service.name"] == "inventory"
    assert [span.name for scope in resource_spans.scope_spans for span in scope.spans] == ["svc process orders"]


# --- logs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exported", [True, False], ids=["export-on", "export-off"])
def test_log_lines_name_the_order_and_the_trace_being_processed(exported: bool) -> None:
    provider, _ = recording()
    tracing = Tracing(provider if exported else PropagatingTracerProvider())
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceContextFilter())
    logger = logging.getLogger("tests.tracing")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        context = task(tracing)
        traced = tracing.processing(context, record(((TRACEPARENT, VALID),)))
        logger.info("inside")
        logger.info("explicit", extra={"order_id": "given"})
        tracing.finished(traced, context, 0)
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    inside, explicit, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["order_id"] == "o-1"
    assert inside["trace_id"] == VALID.decode().split("-")[1]
    assert explicit["order_id"] == "given"
    assert "order_id" not in outside
    assert "trace_id" not in outside


# --- the client ------------------------------------------------------------------------------------


@pytest.mark.parametrize("exported", [True, False], ids=["export-on", "export-off"])
async def test_choreo_publish_starts_the_trace_and_puts_its_traceparent_on_the_record(
    choreo_settings: ChoreoSettings,
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
    exported: bool,
) -> None:
    endpoint, posts = collector.endpoint, collector.posts
    monkeypatch.delenv(OTLP_TRACES_ENDPOINT_ENV, raising=False)
    if exported:
        monkeypatch.setenv(OTLP_ENDPOINT_ENV, endpoint)
    else:
        monkeypatch.delenv(OTLP_ENDPOINT_ENV, raising=False)
    await ensure_topics(choreo_settings, [ORDERS])
    result = choreo(
        choreo_settings, "publish", "order", "--order-id", "o-cli", "--customer", "cust-1",
        "--item", "WIDGET-1:1:9.99", "--country", "DE",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [written] = await read_topic(choreo_settings, ORDERS)
    sent = traceparent_of(written.headers)
    assert sent is not None
    _version, trace_id, span_id, flags = sent.split("-")
    assert int(flags, 16) & 0x01, "sampled"
    if not exported:
        assert posts == []
        return
    # The span exported before the command exited, and it is the one the record names
    [(path, body)] = posts
    assert path == "/v1/traces"
    [resource_spans] = ExportTraceServiceRequest.FromString(body).resource_spans
    resource = {attribute.key: attribute.value.string_value for attribute in resource_spans.resource.attributes}
    assert resource["service.name"] == CLIENT_SERVICE
    [span] = [span for scope in resource_spans.scope_spans for span in scope.spans]
    assert span.name == "publish orders"
    assert span.kind == span.SPAN_KIND_PRODUCER
    assert span.parent_span_id == b""
    assert (span.trace_id.hex(), span.span_id.hex()) == (trace_id, span_id)

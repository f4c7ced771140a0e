"""One OpenTelemetry trace per saga: W3C trace context in a Kafka header on every record, a span per hop.

Every record a service writes (saga events, internal requests and replies, audit records, dead
letters) carries `traceparent` (and `tracestate`, when the trace has one) of the span that wrote it;
a changelog record carries none: it is state, not a step of the saga. The runner processes each
record in a CONSUMER span whose parent comes from the record's headers, so a saga's hops nest into
one trace from the client's publish span on, whichever process or partition each hop runs in.

Export is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
Off, nothing is recorded, yet each hop still writes a fresh span id in the incoming trace, so a
service with export on downstream of one with it off still joins the saga's trace.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_NAMESPACE, Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from schemas.topics import DEAD_LETTER
from services.common.logs import ORDER_ID, TRACE_ID
from services.common.transactions import Outgoing

if TYPE_CHECKING:
    from services.common.processor import Incoming, TaskContext

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_HEADERS = frozenset({TRACEPARENT, TRACESTATE})
TRACER_NAME = "choreo"
ORDER_ID_ATTRIBUTE = "choreo.order_id"
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
OTLP_TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
# The key of these topics is an order id (others are keyed by SKU, customer or alert subject).
ORDER_KEY = "order_id"
_VERSION_00 = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_NO_TRACE = b"0" * 32
_NO_SPAN = b"0" * 16

Headers = Sequence[tuple[str, bytes]]
HeaderTuple = tuple[tuple[str, bytes], ...]

# W3C Trace Context only, whatever OTEL_PROPAGATORS says: it is what the records carry.
_PROPAGATOR = TraceContextTextMapPropagator()


class _RecordHeaders(Getter[Headers]):
    def get(self, carrier: Headers, key: str) -> list[str] | None:
        values = [value.decode(errors="replace") for name, value in carrier if name == key]
        return values or None

    def keys(self, carrier: Headers) -> list[str]:
        return [name for name, _ in carrier]


_GETTER = _RecordHeaders()


# --- headers ------------------------------------------------------------------------------------


def extract(headers: Headers) -> Context:
    """The trace context a record's headers carry; an empty context (a new root) without a valid traceparent."""
    parent = remote_parent(headers)
    return Context() if parent is None else trace.set_span_in_context(NonRecordingSpan(parent), Context())


def remote_parent(headers: Headers) -> SpanContext | None:
    """The span a record's `traceparent` (and `tracestate`) names; None without a valid one."""
    parent: bytes | None = None
    state: bytes | None = None
    for name, value in headers:
        if name == TRACEPARENT:
            if parent is not None:
                return None  # two traceparents: W3C says to ignore both
            parent = value
        elif name == TRACESTATE:
            state = value
    if parent is None:
        return None
    found = _version_00(parent, state)
    if found is None:
        # Anything but a plain version-00 header (another version, surrounding blanks, bad hex): the
        # propagator's rules decide.
        extracted = _PROPAGATOR.extract(headers, context=Context(), getter=_GETTER)
        found = trace.get_current_span(extracted).get_span_context()
    return found if found.is_valid else None


def _version_00(parent: bytes, state: bytes | None) -> SpanContext | None:
    """A version-00 traceparent parsed without the propagator's regular expression: this runs once per record."""
    matched = _VERSION_00.fullmatch(parent)
    if matched is None:
        return None
    trace_id, span_id, flags = int(matched[1], 16), int(matched[2], 16), int(matched[3], 16)
    if trace_id == 0 or span_id == 0:
        return None
    trace_state = TraceState.from_header([state.decode(errors="replace")]) if state else None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags), trace_state=trace_state)


def extract_http(headers: Mapping[str, str]) -> Context:
    """The trace context of an HTTP request's headers; an empty context without a traceparent."""
    return _PROPAGATOR.extract(headers, context=Context())


def linked(context: Context) -> list[trace.Link]:
    """A link to the span of `context`, if it has a valid one."""
    span_context = trace.get_current_span(context).get_span_context()
    return [trace.Link(span_context)] if span_context.is_valid else []


def from_traceparent(traceparent: str | None) -> Context:
    """The context of a stored traceparent; an empty one (a new root) without it."""
    if traceparent is None:
        return Context()
    return extract(((TRACEPARENT, traceparent.encode()),))


def trace_headers(span: trace.Span) -> HeaderTuple:
    """`traceparent` (and `tracestate`) of `span`, as the W3C propagator writes them; nothing for an invalid span."""
    # Formatted here rather than through the propagator's carrier: this runs once per record processed.
    found = span.get_span_context()
    if not found.is_valid:
        return ()
    parent = f"00-{found.trace_id:032x}-{found.span_id:016x}-{found.trace_flags:02x}"
    if not found.trace_state:
        return ((TRACEPARENT, parent.encode()),)
    return ((TRACEPARENT, parent.encode()), (TRACESTATE, found.trace_state.to_header().encode()))


def with_trace(headers: Headers, trace_context: HeaderTuple) -> HeaderTuple:
    """`headers` with their trace context replaced by `trace_context` (a new tuple; records are immutable)."""
    for name, _ in headers:
        if name in TRACE_HEADERS:
            return (*(header for header in headers if header[0] not in TRACE_HEADERS), *trace_context)
    return (*headers, *trace_context)


def traceparent_of(headers: Headers) -> str | None:
    """The `traceparent` header of a record, if it has one."""
    for name, value in headers:
        if name == TRACEPARENT:
            return value.decode(errors="replace")
    return None


def current_trace_headers() -> HeaderTuple:
    """The trace context of the current span, as record headers."""
    return trace_headers(trace.get_current_span())


def stamp(outbox: list[Outgoing], start: int, span: trace.Span) -> None:
    """Give every record in `outbox[start:]` the trace context of `span`."""
    if start < len(outbox):
        stamp_with(outbox, start, trace_headers(span))


def stamp_with(outbox: list[Outgoing], start: int, context: HeaderTuple) -> None:
    """Give every record in `outbox[start:]` the trace context `context` (record headers)."""
    for index in range(start, len(outbox)):
        out = outbox[index]
        outbox[index] = Outgoing(out.topic, out.key, out.value, out.partition, with_trace(out.headers, context))


# --- spans of the runner --------------------------------------------------------------------------


class Processing(Protocol):
    """A record being processed (see `Tracing.processing`)."""

    def finish(self, task: TaskContext, sent: int) -> None: ...


@dataclass
class _Spanned:
    """A record's span from the tracer, current while the record is processed."""

    span: trace.Span
    attached: Token[Context]
    order: Token[str | None] | None

    def finish(self, task: TaskContext, sent: int) -> None:
        span = self.span
        try:
            stamp(task.outbox, sent, span)
            if span.is_recording():
                dead_letters = task.settings.topic(DEAD_LETTER)
                if any(out.topic == dead_letters for out in task.outbox[sent:]):
                    span.set_status(Status(StatusCode.ERROR, "dead-lettered"))
        finally:
            if self.order is not None:
                ORDER_ID.reset(self.order)
            context_api.detach(self.attached)
            span.end()


@dataclass
class _Propagated:
    """Export off, the usual case: no span object at all, only the trace context the record's outputs carry
    (its trace id for the log lines meanwhile)."""

    trace_context: HeaderTuple
    trace_id: Token[str | None]
    order: Token[str | None] | None

    def finish(self, task: TaskContext, sent: int) -> None:
        try:
            stamp_with(task.outbox, sent, self.trace_context)
        finally:
            if self.order is not None:
                ORDER_ID.reset(self.order)
            TRACE_ID.reset(self.trace_id)


class Tracing:
    """Spans of one runner: a CONSUMER span per record, an INTERNAL one per timer that emits for an order.

    `tracer_provider` defaults to the API's global provider, a no-op until a process sets one.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self.tracer = provider.get_tracer(TRACER_NAME)
        # Export off, a record's trace context is rewritten without building a span: this runs once per record.
        self._propagating = self.tracer if isinstance(self.tracer, PropagatingTracer) else None

    def processing(self, task: TaskContext, message: Incoming) -> Processing:
        """Start and make current the span of `message`, a child of the span that wrote it."""
        order_id = _order_id(message)
        if self._propagating is not None:
            propagated = _propagated(message.headers, self._propagating)
            if propagated is not None:
                trace_context, trace_id = propagated
                order = ORDER_ID.set(order_id) if order_id is not None else None
                return _Propagated(trace_context, TRACE_ID.set(trace_id), order)
        parent = remote_parent(message.headers)
        span = self.tracer.start_span(
            f"{task.service} process {message.topic.name}",
            context=Context() if parent is None else trace.set_span_in_context(NonRecordingSpan(parent), Context()),
            kind=SpanKind.CONSUMER,
        )
        if span.is_recording():
            span.set_attributes(
                {
                    "messaging.system": "kafka",
                    "messaging.operation.type": "process",
                    "messaging.destination.name": task.settings.topic(message.topic),
                    "messaging.destination.partition.id": str(message.partition),
                    "messaging.consumer.group.name": task.settings.group(task.service),
                }
            )
            if message.in_process:
                span.set_attribute("choreo.in_process", True)
            else:
                span.set_attribute("messaging.kafka.offset", message.offset)
            if order_id is not None:
                span.set_attribute(ORDER_ID_ATTRIBUTE, order_id)
        attached = context_api.attach(trace.set_span_in_context(span))
        return _Spanned(span, attached, ORDER_ID.set(order_id) if order_id is not None else None)

    def finished(self, processing: Processing, task: TaskContext, sent: int) -> None:
        """End the span; what the record made the task write (`task.outbox[sent:]`) carries it on."""
        processing.finish(task, sent)

    @contextmanager
    def timer(self, task: TaskContext, order_id: str, traceparent: str | None) -> Iterator[trace.Span]:
        """A span for what a timer does for one order, in the trace of `traceparent` (the order's, as its state
        keeps it); a new root without one. What the task writes meanwhile carries it on."""
        sent = len(task.outbox)
        span = self.tracer.start_span(f"{task.service} timer", context=from_traceparent(traceparent))
        if span.is_recording():
            span.set_attribute(ORDER_ID_ATTRIBUTE, order_id)
        order = ORDER_ID.set(order_id)
        try:
            with trace.use_span(span, end_on_exit=True):
                yield span
                stamp(task.outbox, sent, span)
        finally:
            ORDER_ID.reset(order)


def _propagated(headers: Headers, tracer: PropagatingTracer) -> tuple[HeaderTuple, str] | None:
    """Export off: the trace context a record's outputs carry (its parent's trace and flags, a fresh span id,
    the trace state passed on unchanged) and its trace id, straight from the bytes; None for anything but one
    plain version-00 traceparent or none, which the tracer's general path then handles."""
    parent: bytes | None = None
    state: bytes | None = None
    for name, value in headers:
        if name == TRACEPARENT:
            if parent is not None:
                return None
            parent = value
        elif name == TRACESTATE:
            if state is not None:
                return None
            state = value
    if parent is None:
        trace_id, flags, state = b"%032x" % tracer.new_trace_id(), b"01", None
    else:
        matched = _VERSION_00.fullmatch(parent)
        if matched is None or matched[1] == _NO_TRACE or matched[2] == _NO_SPAN:
            return None
        trace_id, flags = matched[1], matched[3]
    header = (TRACEPARENT, b"00-%s-%016x-%s" % (trace_id, tracer.new_span_id(), flags))
    context = (header, (TRACESTATE, state)) if state else (header,)
    return context, trace_id.decode()


def _order_id(message: Incoming) -> str | None:
    if message.topic.key != ORDER_KEY or message.key is None:
        return None
    return message.key.decode(errors="replace")


# --- providers ------------------------------------------------------------------------------------


class PropagatingTracer(trace.NoOpTracer):
    """Export off: records nothing, but each span gets a fresh span id in its parent's trace (a new trace
    without a parent), keeping the parent's flags and trace state, so propagation goes on through this hop."""

    def __init__(self, ids: IdGenerator | None = None) -> None:
        self._ids = ids if ids is not None else RandomIdGenerator()

    def start_span(  # noqa: PLR0917 (the signature of the API's Tracer)
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        return self.child(parent if parent.is_valid else None)

    def new_trace_id(self) -> int:
        return self._ids.generate_trace_id()

    def new_span_id(self) -> int:
        return self._ids.generate_span_id()

    def child(self, parent: SpanContext | None) -> NonRecordingSpan:
        """A span in `parent`'s trace with a fresh id; in a new, sampled trace without a parent."""
        if parent is not None:
            trace_id, flags, state = parent.trace_id, parent.trace_flags, parent.trace_state
        else:
            # A new trace is marked sampled: a service downstream with export on records it.
            trace_id, flags, state = self._ids.generate_trace_id(), TraceFlags(TraceFlags.SAMPLED), None
        span_id = self._ids.generate_span_id()
        return NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags, trace_state=state))


class PropagatingTracerProvider(trace.TracerProvider):
    """The provider of a process that exports nothing: see `PropagatingTracer`."""

    def __init__(self) -> None:
        self._tracer = PropagatingTracer()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> trace.Tracer:
        return self._tracer


def export_endpoint() -> str | None:
    """Where spans go (OTLP/HTTP), from the standard variables; None: export is off."""
    return os.environ.get(OTLP_TRACES_ENDPOINT_ENV) or os.environ.get(OTLP_ENDPOINT_ENV) or None


def tracer_provider(service: str) -> trace.TracerProvider:
    """The provider of a process of `service`: with an OTLP endpoint set, the SDK's, exporting in batches over
    OTLP/HTTP (the exporter reads the endpoint, headers and timeout from the standard OTEL_* variables);
    without one, a `PropagatingTracerProvider`."""
    endpoint = export_endpoint()
    if endpoint is None:
        return PropagatingTracerProvider()
    # Imported only when export is on: it brings protobuf and requests along.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    resource = Resource.create({SERVICE_NAME: service, SERVICE_NAMESPACE: "choreo"})
    provider = SdkTracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("exporting traces", extra={"service": service, "endpoint": endpoint})
    return provider


@contextmanager
def process_tracing(service: str) -> Iterator[trace.TracerProvider]:
    """Tracing for this process, set up once by its entry point, which hands the provider to what it wires
    (the API's global provider is left alone); on exit the spans still buffered are exported."""
    provider = tracer_provider(service)
    try:
        yield provider
    finally:
        if isinstance(provider, SdkTracerProvider):
            provider.shutdown()

"""Export on, in real service processes: with OTEL_EXPORTER_OTLP_ENDPOINT set, every service posts its spans of
an order to the collector, all in the trace the client's record started, and its log lines name that trace."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from schemas.topics import ORDERS
from services.common.publisher import publish
from services.common.settings import ChoreoSettings
from services.common.topics import ensure_topics
from services.common.tracing import ORDER_ID_ATTRIBUTE as ORDER_ATTRIBUTE
from services.common.tracing import OTLP_ENDPOINT_ENV, PropagatingTracerProvider, traceparent_of
from tests.e2e.harness import SAGA_SERVICES, wait_for_events
from tests.e2e.processes import ProcessStack
from tests.e2e.test_saga_outcomes import order
from tests.otlp_collector import otlp_collector
from tests.support import eventually, read_topic

ORDER_ID = "o-exported"


async def test_every_service_exports_its_spans_of_the_order_in_the_client_trace(
    choreo_settings: ChoreoSettings, tmp_path: Path
) -> None:
    with otlp_collector() as collector:
        # Given every service running with export on (inventory also logging its debug lines)
        exported = {OTLP_ENDPOINT_ENV: collector.endpoint}
        overrides = {name: dict(exported) for name in SAGA_SERVICES}
        overrides["inventory"]["CHOREO_LOG_LEVEL"] = "DEBUG"
        await ensure_topics(choreo_settings)
        stack = ProcessStack(choreo_settings, tmp_path / "logs", overrides)
        try:
            await stack.start(SAGA_SERVICES)
            # When a client with export off places an order (its trace still starts, sampled)
            await publish(choreo_settings, [order(ORDER_ID)], tracer_provider=PropagatingTracerProvider())
            await wait_for_events(choreo_settings, ORDER_ID, "OrderCompleted")
        finally:
            stack.close()  # SIGTERM: each process exports what it still buffers before it exits
        # A process killed after the stop timeout would have lost its buffered spans
        exits = {process.label: process.popen.returncode for process in stack.processes if process.popen}
        assert set(exits.values()) == {0}, f"{exits}\n{stack.report()}"
        [placed] = await read_topic(choreo_settings, ORDERS)
        sent = traceparent_of(placed.headers)
        assert sent is not None
        trace_id = bytes.fromhex(sent.split("-")[1])

        def ordered(spans: list[tuple[str, Span]]) -> list[tuple[str, Span]]:
            return [
                (service, span)
                for service, span in spans
                if any(item.key == ORDER_ATTRIBUTE and item.value.string_value == ORDER_ID for item in span.attributes)
            ]

        # Then each service exported spans of the order, every one of them in the client's trace
        spans = await eventually(
            lambda: _now(ordered(collector.spans())),
            lambda found: {service for service, _ in found} == set(SAGA_SERVICES),
            timeout=30,
        )
        assert {span.trace_id for _, span in spans} == {trace_id}
        # And the first hop's parent is the client's span
        [first] = [span for _, span in spans if span.name == "inventory process orders"]
        assert first.parent_span_id.hex() == sent.split("-")[2]
    # And a service's log line about the order names the order's trace
    [inventory] = stack.instances("inventory")
    settled = [record for record in inventory.log_records() if record.get("message") == "reservation settled"]
    assert settled
    assert {(record["order_id"], record["trace_id"]) for record in settled} == {(ORDER_ID, trace_id.hex())}


async def _now(value: list[tuple[str, Span]]) -> list[tuple[str, Span]]:
    return value

"""A stand-in OTLP/HTTP collector for tests: records every POST and answers 200."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

TRACES_PATH = "/v1/traces"


@dataclass
class Collector:
    endpoint: str
    posts: list[tuple[str, bytes]] = field(default_factory=list)

    def spans(self) -> list[tuple[str, Span]]:
        """(service.name, span) of every span posted to /v1/traces so far."""
        found: list[tuple[str, Span]] = []
        for path, body in list(self.posts):
            if path != TRACES_PATH:
                continue
            for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
                attributes = {item.key: item.value.string_value for item in resource_spans.resource.attributes}
                service = attributes.get("service.name", "")
                found.extend((service, span) for scope in resource_spans.scope_spans for span in scope.spans)
        return found


class _Recorder(BaseHTTPRequestHandler):
    posts: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.posts.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests read what arrived, not the access log."""


@contextmanager
def otlp_collector() -> Iterator[Collector]:
    """A collector listening on a free local port until the block ends."""
    collector = Collector("")
    handler = type("Recorder", (_Recorder,), {"posts": collector.posts})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    collector.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield collector
    finally:
        server.shutdown()
        server.server_close()

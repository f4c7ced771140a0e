"""A local OTLP/HTTP receiver for measuring what trace export costs: it accepts and counts, nothing more.

    python -m benchmarks.otlp_sink [--port 4318]

Point the stack at it with `OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318`; on SIGINT or SIGTERM
it logs how many export requests and bytes it took.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

log = logging.getLogger("otlp-sink")


class Received:
    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, size: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += size


def handler_for(received: Received) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(size)
            received.add(size)
            # An empty ExportTraceServiceResponse: full success.
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            log.debug(format, *args)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    received = Received()
    server = ThreadingHTTPServer((args.host, args.port), handler_for(received))

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("listening on http://%s:%d", args.host, server.server_port)
    server.serve_forever()
    log.info("received %d export requests, %d bytes", received.requests, received.bytes)


if __name__ == "__main__":
    main()

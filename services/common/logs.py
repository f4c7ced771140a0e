"""Structured logging: one JSON object per line on stderr."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {"message", "asctime"}

ORDER_ID: ContextVar[str | None] = ContextVar("choreo_order_id", default=None)
"""The order whose record (or timer) is being processed; the runner sets it, every log line then names it."""
TRACE_ID: ContextVar[str | None] = ContextVar("choreo_trace_id", default=None)
"""The trace of the record being processed when no span object stands for it (export off)."""


class TraceContextFilter(logging.Filter):
    """Adds `order_id` (of the record being processed) and `trace_id` (of the current span) to each log
    record, unless the call gave them itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "order_id"):
            order_id = ORDER_ID.get()
            if order_id is not None:
                record.order_id = order_id
        if not hasattr(record, "trace_id"):
            span_context = trace.get_current_span().get_span_context()
            if span_context.is_valid:
                record.trace_id = trace.format_trace_id(span_context.trace_id)
            else:
                trace_id = TRACE_ID.get()
                if trace_id is not None:
                    record.trace_id = trace_id
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _RESERVED})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", *, structured: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if structured else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(TraceContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka reports every reconnect attempt at INFO/WARNING; its errors still come through.
    logging.getLogger("aiokafka").setLevel(max(root.level, logging.WARNING))

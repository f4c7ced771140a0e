"""What one state document costs as a pydantic model and as a msgspec Struct: build, change, encode, decode.

    python -m benchmarks.state_codec [--number 20000]

The document is the audit's per-order state as it stands mid-saga (four event ids written, two topics
seen, the placement time). The pydantic model has the same fields, defaults and zone-aware datetimes as
the Struct the audit keeps, so the figures compare the two libraries and nothing else. It prints the
best of three `timeit` repeats per operation, in µs.
"""

from __future__ import annotations

import argparse
import sys
import timeit
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import msgspec
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from services.audit.domain import AuditOrderState, HeldEvent


class ModelHeldEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    event_id: str
    causation_id: str | None
    after: str | None = None
    type: str
    occurred_at: AwareDatetime
    held_since: AwareDatetime
    raw: str
    traceparent: str | None = None


class ModelOrderState(BaseModel):
    model_config = ConfigDict(frozen=True)

    order_id: str
    written: list[str] = Field(default_factory=list)
    held: dict[str, ModelHeldEvent] = Field(default_factory=dict)
    closed: bool = False
    last_by_topic: dict[str, str] = Field(default_factory=dict)
    placed_at: AwareDatetime | None = None


def operations() -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """Each operation as (pydantic, msgspec)."""
    now = datetime.now(UTC)
    ids = [str(uuid.uuid4()) for _ in range(6)]
    fields = {"order_id": "o-1", "written": ids[:4], "last_by_topic": {"orders": ids[0], "payment.events": ids[1]}}
    model = ModelOrderState(**fields, placed_at=now)
    struct = AuditOrderState(**fields, placed_at=now)  # type: ignore[arg-type]
    model_json, struct_json = model.model_dump_json().encode(), msgspec.json.encode(struct)
    decoder, encoder = msgspec.json.Decoder(AuditOrderState), msgspec.json.Encoder()
    event = {"event_id": ids[4], "causation_id": ids[3], "type": "PaymentCharged", "occurred_at": now}
    return {
        "build an event to hold": (
            lambda: ModelHeldEvent(**event, held_since=now, raw="{}"),
            lambda: HeldEvent(**event, held_since=now, raw="{}"),  # type: ignore[arg-type]
        ),
        "change two fields": (
            lambda: model.model_copy(update={"written": ids, "closed": True}),
            lambda: msgspec.structs.replace(struct, written=ids, closed=True),
        ),
        "encode to JSON": (model.model_dump_json, lambda: encoder.encode(struct)),
        "decode and validate JSON": (
            lambda: ModelOrderState.model_validate_json(model_json),
            lambda: decoder.decode(struct_json),
        ),
    }


def microseconds(operation: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(operation, number=number, repeat=3)) / number * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000, help="calls per timeit repeat")
    args = parser.parse_args(argv)
    lines = [f"{'µs per call':28s} {'pydantic':>10s} {'msgspec':>10s} {'ratio':>8s}"]
    for name, (with_pydantic, with_msgspec) in operations().items():
        slow, fast = microseconds(with_pydantic, args.number), microseconds(with_msgspec, args.number)
        lines.append(f"{name:28s} {slow:10.2f} {fast:10.2f} {slow / fast:7.1f}x")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

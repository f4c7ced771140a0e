"""Inventory's rules and state, free of Kafka.

Two kinds of state live in one store: an order's progress (`order:<order_id>`, owned by the
order's task) and a SKU's stock (`sku:<sku>`, owned by the SKU's task). They talk through the
internal `StockRequest` / `StockReply` messages, because one task may not touch another's keys.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Self

import msgspec
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from schemas.events import OrderDetails, Shortage, StockLine
from schemas.primitives import OrderId, Quantity, Sku
from services.common.saga import OrderState

TEXT_LIMIT = 500
"""Longest reason the contract accepts (`Text`)."""

_SKU = TypeAdapter(Sku)
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


def sku_key(sku: str) -> str:
    return f"sku:{sku}"


def fit(text: str) -> str:
    """`text` cut to what a contract reason may hold."""
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"


# --- the catalog ----------------------------------------------------------------------------------


class CatalogError(ValueError):
    """The catalog is unusable; the message names the file and the offending entry."""


def load_catalog(path: Path) -> dict[str, int]:
    """The starting stock per SKU, read from a JSON object `{"<sku>": <non-negative int>}`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CatalogError(f"inventory catalog {path}: cannot be read ({error.strerror or error})") from error
    try:
        document = json.loads(text, object_pairs_hook=_pairs)
    except json.JSONDecodeError as error:
        raise CatalogError(f"inventory catalog {path}: not JSON ({error})") from error
    except CatalogError as error:
        raise CatalogError(f"inventory catalog {path}: {error}") from error
    return parse_catalog(document, origin=f"inventory catalog {path}")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads would silently keep the last of two equal keys; a catalog must be unambiguous.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise CatalogError(f'entry "{key}" appears more than once')
        result[key] = value
    return result


def parse_catalog(document: object, *, origin: str = "inventory catalog") -> dict[str, int]:
    if not isinstance(document, dict):
        kind = type(document).__name__
        raise CatalogError(f"{origin}: must be a JSON object mapping SKU to starting stock, not {kind}")
    catalog: dict[str, int] = {}
    for sku, stock in document.items():
        try:
            _SKU.validate_python(sku)
        except ValidationError as error:
            raise CatalogError(
                f'{origin}: entry "{sku}": not a valid SKU (1-64 letters, digits or "._:@-", '
                f"starting with a letter or digit): {error.errors()[0]['msg']}"
            ) from error
        # bool is an int in Python, but `true` is not a stock level.
        if isinstance(stock, bool) or not isinstance(stock, int) or stock < 0:
            raise CatalogError(f'{origin}: entry "{sku}": starting stock must be a non-negative integer, not {stock!r}')
        catalog[sku] = stock
    return catalog


# --- the SKU stage ------------------------------------------------------------------------------------


class SkuStock(msgspec.Struct, frozen=True, kw_only=True):
    """One SKU's stock. Every change is checked, so a bug cannot store an oversold or leaking SKU.

    A Struct rather than a model: it is rebuilt and stored on every hold, release and commit of the
    SKU, and `__post_init__` runs the same checks whether it is built, changed or read back.
    """

    sku: str
    initial: NonNegative
    available: NonNegative
    reserved: NonNegative = 0
    shipped: NonNegative = 0
    holds: dict[str, int] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = self._unconserved()
        if problem is not None:
            raise ValueError(problem)

    def _unconserved(self) -> str | None:
        if min(self.available, self.reserved, self.shipped) < 0:
            counts = f"available {self.available}, reserved {self.reserved}, shipped {self.shipped}"
            return f"{self.sku}: a negative count ({counts})"
        if self.available + self.reserved + self.shipped != self.initial:
            return (
                f"{self.sku}: available {self.available} + reserved {self.reserved} + shipped {self.shipped} "
                f"!= initial {self.initial}"
            )
        if self.reserved != sum(self.holds.values()):
            return f"{self.sku}: reserved {self.reserved} differs from the holds {self.holds}"
        return None

    @classmethod
    def fresh(cls, sku: str, initial: int) -> SkuStock:
        return cls(sku=sku, initial=initial, available=initial)

    def hold(self, order_id: str, quantity: int) -> tuple[SkuStock, bool]:
        """Reserve `quantity` for the order if all of it is available; a repeated hold answers as the first."""
        if order_id in self.holds:
            return self, True
        if quantity > self.available:
            return self, False
        return (
            self._with(
                available=self.available - quantity,
                reserved=self.reserved + quantity,
                holds={**self.holds, order_id: quantity},
            ),
            True,
        )

    def release(self, order_id: str) -> SkuStock:
        """Return the order's hold to the available pool; no hold, no change."""
        quantity = self.holds.get(order_id)
        if quantity is None:
            return self
        return self._with(
            available=self.available + quantity,
            reserved=self.reserved - quantity,
            holds={o: q for o, q in self.holds.items() if o != order_id},
        )

    def commit(self, order_id: str) -> SkuStock:
        """The order shipped: its hold leaves the warehouse for good; no hold, no change."""
        quantity = self.holds.get(order_id)
        if quantity is None:
            return self
        return self._with(
            reserved=self.reserved - quantity,
            shipped=self.shipped + quantity,
            holds={o: q for o, q in self.holds.items() if o != order_id},
        )

    def _with(self, **changes: Any) -> SkuStock:
        return msgspec.structs.replace(self, **changes)


# --- internal messages ------------------------------------------------------------------------------


class StockOperation(StrEnum):
    HOLD = "hold"
    RELEASE = "release"
    COMMIT = "commit"


class StockRequest(BaseModel):
    """Order stage → SKU stage (topic STOCK_REQUESTS, key sku)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operation: StockOperation
    sku: Sku
    order_id: OrderId
    quantity: Quantity | None = Field(default=None, description="Required for a hold.")

    @model_validator(mode="after")
    def _hold_has_quantity(self) -> Self:
        if self.operation is StockOperation.HOLD and self.quantity is None:
            raise ValueError("quantity: required for a hold")
        return self


class StockReply(BaseModel):
    """SKU stage → order stage (topic STOCK_REPLIES, key order_id): the answer to a hold."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    order_id: OrderId
    sku: Sku
    requested: Quantity
    held: bool
    available: int = Field(ge=0, description="What the SKU had available after answering.")


# --- the order stage ------------------------------------------------------------------------------------


class OrderStatus(StrEnum):
    NEW = "new"
    """Nothing seen yet for the order."""
    RESERVING = "reserving"
    """Holds asked of every SKU; waiting for their replies."""
    RESERVED = "reserved"
    REJECTED = "rejected"
    """Some SKU was short; whatever was held went back. Closed."""
    RELEASED = "released"
    """Compensated after holding stock. Closed."""
    SHIPPED = "shipped"
    """The order completed; its holds became shipped stock. Closed."""
    CANCELLED = "cancelled"
    """Cancelled before any reservation was announced (before OrderPlaced, or while holds were in flight). Closed."""


_CLOSED = frozenset({OrderStatus.REJECTED, OrderStatus.RELEASED, OrderStatus.SHIPPED, OrderStatus.CANCELLED})


class Cancellation(BaseModel):
    """A cancellation that arrived while holds were in flight: cancelled at once, holds given back later."""

    model_config = ConfigDict(frozen=True)

    reason: str
    trigger_id: str


class InventoryOrder(OrderState):
    status: OrderStatus = OrderStatus.NEW
    order: OrderDetails | None = None
    trigger_id: str | None = Field(default=None, description="event_id of the OrderPlaced that began the reservation.")
    awaiting: dict[str, int] = Field(default_factory=dict, description="Holds asked, reply not yet in: sku → quantity.")
    held: dict[str, int] = Field(default_factory=dict, description="What the SKUs held (kept after release or ship).")
    shortages: list[Shortage] = Field(default_factory=list)
    cancellation: Cancellation | None = None

    def finished(self) -> bool:
        return self.status in _CLOSED and not self.awaiting

    def pending(self) -> bool:
        # Holds in flight or stock reserved: forgetting the order would strand that stock.
        return self.status in (OrderStatus.RESERVING, OrderStatus.RESERVED) or bool(self.awaiting)

    def marker(self) -> Self:
        # `held` stays: a late duplicate reply is told from a stranded hold by it.
        return super().marker().model_copy(update={"order": None, "shortages": [], "cancellation": None})

    def stock_lines(self) -> list[StockLine]:
        return [StockLine(sku=sku, quantity=quantity) for sku, quantity in sorted(self.held.items())]


def shortage_reason(shortages: list[Shortage]) -> str:
    shown = ", ".join(f"{s.sku} (requested {s.requested}, available {s.available})" for s in shortages[:5])
    more = f" and {len(shortages) - 5} more" if len(shortages) > 5 else ""
    return fit(f"insufficient stock: {shown}{more}")

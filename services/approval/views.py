"""Read side for the reviewer API: approvals listed from the tasks' state stores.

The stores are those of the tasks this process owns (`TransactionalRunner.store(p)`), so an
instance answers for its own partitions only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

from pydantic import BaseModel

from services.approval.domain import DEADLINES_KEY, ApprovalState, ApprovalStatus, ApprovalView, DeadlineIndex
from services.common.saga import order_key

Model = TypeVar("Model", bound=BaseModel)

_ORDER_PREFIX = order_key("")


class StateReader(Protocol):
    def get(self, key: str, model: type[Model]) -> Model | None: ...

    def keys(self) -> list[str]: ...


def find_approval(stores: Iterable[StateReader], order_id: str) -> ApprovalState | None:
    """The order's approval state, for `rule_on_decision`; None when no owned task knows the order."""
    for store in stores:
        state = store.get(order_key(order_id), ApprovalState)
        if state is not None:
            return state
    return None


def list_approvals(stores: Iterable[StateReader], status: ApprovalStatus | None = None) -> list[ApprovalView]:
    """Approvals with `status` (every one that reached the approval step when None), oldest request first."""
    found: list[ApprovalState] = []
    for store in stores:
        found.extend(state for state in _candidates(store, status) if status is None or state.status is status)
    views = [ApprovalView.of(state) for state in found if state.status is not ApprovalStatus.AWAITING_PAYMENT]
    return sorted(views, key=lambda view: (view.requested_at is None, view.requested_at, view.order_id))


def _candidates(store: StateReader, status: ApprovalStatus | None) -> Iterable[ApprovalState]:
    if status is ApprovalStatus.PENDING:
        # The deadline index names exactly the pending approvals: no need to decode every order.
        index = store.get(DEADLINES_KEY, DeadlineIndex) or DeadlineIndex()
        keys = [order_key(order_id) for order_id in index.timers]
    else:
        stored = store.keys()
        keys = [key for key in stored if key.startswith(_ORDER_PREFIX)]
    for key in keys:
        state = store.get(key, ApprovalState)
        if state is not None:
            yield state

"""Shipping's StreamApp and its wiring."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from schemas.envelope import Source
from schemas.topics import APPROVAL_EVENTS, ORDERS, SHIPPING_STATE, Topic
from services.common.processor import Incoming, TaskContext
from services.common.saga import apply_once, decode
from services.shipping.domain import ShippingOrderState, ShippingPolicy
from services.shipping.handlers import handlers
from services.shipping.settings import ShippingSettings


class ShippingApp:
    name: str = "shipping"
    inputs: Sequence[Topic] = (APPROVAL_EVENTS, ORDERS)
    changelog: Topic = SHIPPING_STATE
    in_process: Sequence[Topic] = ()
    # Read for cancellation requests; most of what arrives there is orders placed.
    mostly_skipped: Sequence[Topic] = (ORDERS,)

    def __init__(self, policy: ShippingPolicy) -> None:
        self.policy = policy
        self._handlers = handlers(policy)

    def process(self, task: TaskContext, message: Incoming) -> None:
        envelope = decode(task, message, handles=self._handlers)
        if envelope is None:
            return
        apply_once(
            task,
            message,
            envelope,
            source=Source.SHIPPING,
            model=ShippingOrderState,
            handlers=self._handlers,
        )

    def tick(self, task: TaskContext, now: datetime) -> None:
        """Shipping has no timers."""


def build_app(settings: ShippingSettings) -> ShippingApp:
    return ShippingApp(ShippingPolicy(countries=settings.shipping_countries, carrier=settings.shipping_carrier))

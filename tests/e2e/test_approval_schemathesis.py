"""schemathesis against the reviewer API's own OpenAPI schema, in process (ASGI).

Valid and invalid requests (positive and negative generation), with the token and without it: no
5xx, every status code and body as documented. The read model holds approvals in every status, so
generated requests meet pending, closed and unknown orders alike.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import schemathesis
from fastapi import FastAPI
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.generation.case import Case
from schemathesis.schemas import BaseSchema

from schemas.topics import APPROVAL_DECISIONS, ORDERS, PAYMENT_EVENTS
from services.approval.api import create_api
from services.approval.readmodel import ApprovalsView
from services.approval.settings import ApprovalSettings
from tests.approval.support import DAY, T0, Clock, Harness, RecordingPublisher, cancel, charged, decision, pending

TOKEN = "schemathesis-token-51d0"
EXAMPLES = 100


def seeded_api() -> FastAPI:
    """The API over approvals in every status, with ids like those schemathesis draws from the pattern."""
    harness = Harness(ApprovalSettings(_env_file=None, environment="test", approval_token=SecretStr(TOKEN)))
    for order_id in ("0", "A", "a", "o-1", "o-2"):
        pending(harness, order_id)
    harness.feed(APPROVAL_DECISIONS, decision("o-2", False, "bob"))
    harness.feed(PAYMENT_EVENTS, charged("1", "5.00"))
    pending(harness, "o-3", T0 - DAY)
    harness.tick(T0 + timedelta(minutes=1))
    pending(harness, "o-4")
    harness.feed(ORDERS, cancel("o-4"))
    view = ApprovalsView()
    for records in harness.changelog.values():
        for key, value in records:
            view.apply(key, value)
    view.mark_caught_up()
    return create_api(harness.settings, view, RecordingPublisher(), Clock(T0 + timedelta(minutes=5)))


def load_schema() -> BaseSchema:
    loaded = schemathesis.openapi.from_asgi("/openapi.json", seeded_api())
    loaded.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES, deterministic=True
    )
    return loaded


# Loaded at collection: schemathesis's fixture-based loader needs pytest internals that pytest 9 no longer has.
schema = load_schema()


@schema.parametrize()
def test_with_the_token_nothing_breaks_the_schema(case: Case[Any]) -> None:
    response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500


@schema.parametrize()
def test_without_a_valid_token_every_approvals_route_is_401(case: Case[Any]) -> None:
    response = case.call_and_validate(headers={"Authorization": "Bearer not-the-token"})
    if case.path.startswith("/approvals") and case.method.upper() == case.operation.method.upper():
        assert response.status_code == 401

"""The reviewer API: list and read approvals, submit decisions; also the reviewer page and /health.

Decisions are not applied here: the API checks them against the read model with the stream side's
own rule (`rule_on_decision`, at the submission time it stamps on the event), publishes an
`ApprovalDecisionSubmitted` and answers 202. The stream side rules last, so a decision that a
concurrent one beat on the way is recorded on audit as `ApprovalDecisionIgnored`.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response, Security, status
from fastapi.dependencies.models import Dependant
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.envelope import Envelope, Source
from schemas.events import Address, ApprovalDecisionSubmitted, OrderLine
from schemas.primitives import Money
from services.approval.domain import ApprovalState, ApprovalStatus, Problem, rule_on_decision
from services.approval.publisher import DecisionPublisher, PublishError
from services.approval.readmodel import ApprovalsView, public_status
from services.approval.settings import ApprovalSettings
from services.common.tracing import ORDER_ID_ATTRIBUTE, TRACER_NAME, extract_http, from_traceparent, linked

log = logging.getLogger(__name__)

STATIC_DIR = FilePath(__file__).parent / "static"
PROTECTED_PREFIX = "/approvals"
# The same constraints as schemas.primitives.OrderId, repeated because a path parameter needs them spelled out.
ORDER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"
DECISION_ROUTE = "/approvals/{order_id}/decision"

ReviewStatus = Literal["pending", "granted", "denied", "timed_out", "cancelled"]
Readiness = Callable[[], tuple[bool, Mapping[str, Any]]]


# --- models -----------------------------------------------------------------------------------


def _encodable(text: str) -> str:
    # JSON allows lone surrogates ("\ud800"), which no UTF-8 message can carry.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from error
    return text


class DecisionIn(BaseModel):
    """A reviewer's decision on one pending approval."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"approved": True, "reviewer": "alice", "comment": "customer verified"}]},
    )

    approved: StrictBool = Field(description="true grants the approval, false denies it.")
    reviewer: Annotated[str, AfterValidator(_encodable)] = Field(
        min_length=1, max_length=100, pattern=r"\S", description="Who decides; recorded on the decision event."
    )
    comment: Annotated[str, AfterValidator(_encodable)] | None = Field(
        default=None, max_length=1000, description="Optional note, carried on ApprovalGranted/ApprovalDenied."
    )


class DecisionAccepted(BaseModel):
    """The decision was published; its outcome follows on approval.events (Granted, Denied or DecisionIgnored)."""

    decision_event_id: uuid.UUID = Field(description="event_id of the ApprovalDecisionSubmitted published.")
    order_id: str
    approved: bool
    reviewer: str
    submitted_at: AwareDatetime = Field(description="The decision's occurred_at; the deadline is checked against it.")


class ApprovalOut(BaseModel):
    """One order's approval as the reviewer sees it."""

    order_id: str
    status: ReviewStatus
    order_cancelled: bool = Field(description="A cancellation of the order was requested (whatever the status).")
    customer_id: str | None
    amount: Money | None
    currency: str | None
    items: list[OrderLine]
    ship_to: Address | None
    requested_at: AwareDatetime | None = Field(description="When a reviewer was asked; null for system grants.")
    deadline: AwareDatetime | None
    escalated: bool
    reviewer: str | None = Field(description='Who decided: a reviewer, or "system" below the threshold.')
    comment: str | None
    decision_event_id: str | None = Field(description="The decision that won, once one did.")
    closed_at: AwareDatetime | None
    decision_in_flight: str | None = Field(
        description="A decision this instance published that the stream side has not ruled on yet."
    )

    @classmethod
    def of(cls, state: ApprovalState, shown: ApprovalStatus, in_flight: str | None) -> ApprovalOut:
        order = state.order
        return cls(
            order_id=state.order_id,
            status=shown.value,
            order_cancelled=state.cancelled,
            customer_id=order.customer_id if order is not None else None,
            amount=state.amount,
            currency=state.currency,
            items=list(order.items) if order is not None else [],
            ship_to=order.ship_to if order is not None else None,
            requested_at=state.requested_at,
            deadline=state.deadline,
            escalated=state.escalated,
            reviewer=state.reviewer,
            comment=state.comment,
            decision_event_id=state.decision_event_id,
            closed_at=state.closed_at,
            decision_in_flight=in_flight,
        )


class ApprovalPage(BaseModel):
    items: list[ApprovalOut]
    total: int = Field(description="How many approvals have this status.")
    limit: int
    offset: int


class ErrorOut(BaseModel):
    detail: str = Field(description="What went wrong, in words.")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description='Where: ["body", "reviewer"], ["query", "limit"], ...')
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    detail: str = Field(description="Every problem, `location: message`, joined by `; `.")
    errors: list[FieldError]


class HealthOut(BaseModel):
    status: Literal["ok", "starting"]
    checks: dict[str, Any] = Field(description="Read model, publisher and stream runner, each with its state.")


Responses = dict[int | str, dict[str, Any]]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorOut, "description": description}


UNAUTHORIZED: Responses = {401: _error("Missing or wrong bearer token.")}
INVALID: Responses = {422: {"model": ValidationErrorOut, "description": "Malformed path, query or body."}}
UNAVAILABLE: Responses = {503: _error("The read model is still loading, or the decision could not be published.")}
NOT_FOUND: Responses = {404: _error("No approval exists for this order.")}
TOO_LARGE: Responses = {413: _error("The request body is larger than the API reads (CHOREO_APPROVAL_HTTP_MAX_BODY).")}
CONFLICT: Responses = {
    409: _error("The approval accepts no decision: decided, timed out, past its deadline or cancelled.")
}


# --- what each app instance carries, and the dependencies reading it ---------------------------


@dataclass(frozen=True)
class ApiContext:
    view: ApprovalsView
    publisher: DecisionPublisher
    clock: Callable[[], datetime]
    token: bytes
    readiness: Readiness | None
    tracer: trace.Tracer

    def authorized(self, request: Request) -> bool:
        presented = _bearer(request.headers.get("authorization"))
        return presented is not None and hmac.compare_digest(presented.encode(), self.token)


def _context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.approvals
    return context


Context = Annotated[ApiContext, Depends(_context)]
BEARER = HTTPBearer(auto_error=False, description="The reviewer token (CHOREO_APPROVAL_TOKEN).")


def _require_reviewer(
    request: Request, context: Context, _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]
) -> None:
    if not context.authorized(request):
        raise _unauthorized(request)


def _current_view(context: Context) -> ApprovalsView:
    if not context.view.caught_up:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the approvals are still loading; retry shortly")
    return context.view


Reviewer = Annotated[None, Depends(_require_reviewer)]
View = Annotated[ApprovalsView, Depends(_current_view)]
OrderIdParam = Annotated[
    str, Path(min_length=1, max_length=64, pattern=ORDER_ID_PATTERN, description="The order's id.")
]


# --- routes -----------------------------------------------------------------------------------


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def _only_declared_query(request: Request) -> None:
    # Like the body (extra="forbid"), a parameter the route does not know is a mistake worth reporting.
    declared = _query_names(request.scope["route"].dependant)
    unknown = sorted(set(request.query_params) - declared)
    if unknown:
        raise RequestValidationError(
            [{"loc": ("query", name), "msg": "Unknown query parameter", "type": "extra_forbidden"} for name in unknown]
        )


approvals = APIRouter(dependencies=[Depends(_only_declared_query)])
operations = APIRouter()


@approvals.get("/approvals", response_model=ApprovalPage, responses={**UNAUTHORIZED, **INVALID, **UNAVAILABLE},
            tags=["approvals"])  # fmt: skip
async def list_approvals(
    _reviewer: Reviewer,
    view: View,
    status_filter: Annotated[ReviewStatus, Query(alias="status", description="Which approvals.")] = "pending",
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> ApprovalPage:
    """List approvals by status: pending ones most urgent first, closed ones most recent first."""
    shown = ApprovalStatus(status_filter)
    page = view.page(shown, limit, offset)
    items = [ApprovalOut.of(state, shown, view.claimed(state.order_id)) for state in page.items]
    return ApprovalPage(items=items, total=page.total, limit=limit, offset=offset)


@approvals.get("/approvals/{order_id}", response_model=ApprovalOut,
            responses={**UNAUTHORIZED, **NOT_FOUND, **INVALID, **UNAVAILABLE}, tags=["approvals"])  # fmt: skip
async def get_approval(order_id: OrderIdParam, _reviewer: Reviewer, view: View) -> ApprovalOut:
    """Read one order's approval."""
    state = view.get(order_id)
    shown = public_status(state) if state is not None else None
    if state is None or shown is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no approval for order {order_id}")
    return ApprovalOut.of(state, shown, view.claimed(order_id))


@approvals.post(DECISION_ROUTE, status_code=status.HTTP_202_ACCEPTED, response_model=DecisionAccepted,
             responses={**UNAUTHORIZED, **NOT_FOUND, **CONFLICT, **TOO_LARGE, **INVALID, **UNAVAILABLE},
             tags=["approvals"])  # fmt: skip
async def submit_decision(
    order_id: OrderIdParam,
    decision: DecisionIn,
    _reviewer: Reviewer,
    view: View,
    context: Context,
    *,
    request: Request,
    response: Response,
) -> DecisionAccepted:
    """Approve or deny a pending approval; the first valid decision wins."""
    state = view.get(order_id)
    # The decision is a step of the order's saga: its span joins the order's trace (kept by the approval
    # state); the caller's own trace, if it sent one, is only linked.
    with context.tracer.start_as_current_span(
        f"POST {DECISION_ROUTE}",
        context=from_traceparent(state.traceparent if state is not None else None),
        kind=SpanKind.SERVER,
        links=linked(extract_http(request.headers)),
        attributes={"http.request.method": "POST", "http.route": DECISION_ROUTE, ORDER_ID_ATTRIBUTE: order_id},
        # A refused decision (4xx) is the client's problem, not a failure of the server.
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            accepted = await _decide(order_id, state, decision, view=view, context=context, response=response)
        except HTTPException as error:
            span.set_attribute("http.response.status_code", error.status_code)
            if error.status_code >= status.HTTP_500_INTERNAL_SERVER_ERROR:
                span.set_status(StatusCode.ERROR, str(error.detail))
            raise
        span.set_attribute("http.response.status_code", status.HTTP_202_ACCEPTED)
        return accepted


async def _decide(
    order_id: str,
    state: ApprovalState | None,
    decision: DecisionIn,
    *,
    view: ApprovalsView,
    context: ApiContext,
    response: Response,
) -> DecisionAccepted:
    submitted_at = context.clock()
    ruling = rule_on_decision(state, submitted_at)
    if ruling.problem is Problem.NOT_FOUND:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"order {order_id}: {ruling.reason}")
    if ruling.problem is Problem.CONFLICT:
        raise HTTPException(status.HTTP_409_CONFLICT, f"order {order_id}: {ruling.reason}")
    event = ApprovalDecisionSubmitted(approved=decision.approved, reviewer=decision.reviewer, comment=decision.comment)
    envelope = Envelope.new(event, order_id=order_id, source=Source.APPROVAL, occurred_at=submitted_at)
    decision_id = str(envelope.event_id)
    holder = view.claim(order_id, decision_id)
    if holder is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"order {order_id}: decision {holder} is already being processed")
    try:
        await context.publisher.publish(envelope)
    except PublishError as error:
        view.release(order_id, decision_id)
        log.warning("decision not published", extra={"order_id": order_id, "error": str(error)})
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "the decision could not be published; retry"
        ) from error
    log.info(
        "decision published",
        extra={"order_id": order_id, "decision_event_id": decision_id, "approved": decision.approved,
               "reviewer": decision.reviewer},
    )  # fmt: skip
    response.headers["Location"] = f"/approvals/{order_id}"
    return DecisionAccepted(
        decision_event_id=envelope.event_id,
        order_id=order_id,
        approved=decision.approved,
        reviewer=decision.reviewer,
        submitted_at=submitted_at,
    )


@operations.get("/health", response_model=HealthOut, tags=["operations"],
            responses={503: {"model": HealthOut, "description": "Starting, or a part is not running."}})  # fmt: skip
async def health(context: Context, response: Response) -> HealthOut:
    """Report whether the read model is loaded and the stream side runs (no token needed)."""
    view = context.view
    checks: dict[str, Any] = {"read_model": {"caught_up": view.caught_up, "approvals": len(view)}}
    healthy = view.caught_up
    if context.readiness is not None:
        ready, details = context.readiness()
        healthy = healthy and ready
        checks.update(details)
    if not healthy:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return HealthOut(status="ok" if healthy else "starting", checks=checks)


@operations.get("/", include_in_schema=False)
async def reviewer_page() -> FileResponse:
    """Serve the reviewer page."""
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


def _stranger(request: Request) -> JSONResponse | None:
    """401 for a protected route without the token: a body that is not even JSON fails before any dependency runs."""
    if not request.url.path.startswith(PROTECTED_PREFIX) or _context(request).authorized(request):
        return None
    problem = _unauthorized(request)
    return JSONResponse({"detail": problem.detail}, status_code=problem.status_code, headers=problem.headers)


def _unprocessable(errors: list[FieldError]) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(str(part) for part in e.loc)}: {e.msg}" for e in errors) or "invalid request"
    body = ValidationErrorOut(detail=detail, errors=errors)
    return JSONResponse(body.model_dump(mode="json"), status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _invalid_request(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    return _stranger(request) or _unprocessable([_field_error(item) for item in error.errors()])


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, StarletteHTTPException)
    if error.status_code == status.HTTP_400_BAD_REQUEST:
        # FastAPI's answer to a body it cannot decode at all (not UTF-8, say): malformed like any other, so 422.
        problem = FieldError(loc=["body"], msg=f"{error.detail}: send a JSON object in UTF-8", type="body_unreadable")
        return _stranger(request) or _unprocessable([problem])
    return await http_exception_handler(request, error)


# --- the body limit ---------------------------------------------------------------------------


class _BodyTooLargeError(Exception):
    """Raised into the app by `BodyLimit`'s receive when the body passes the limit."""


class BodyLimit:
    """Answer 413 to a request body over `limit` bytes, without ever handing the app more than `limit`.

    A declared Content-Length over the limit is refused before a byte of the body is read. A body
    without one (chunked) is counted as it streams in: the chunk that passes the limit is not handed
    on, the app's own answer to the broken body is dropped and 413 is sent instead. The connection is
    left open: uvicorn discards the rest of the body as it arrives, without keeping it. Closing the
    connection instead would reset it under a client still sending, which then never reads the 413.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.limit:
            await self._refuse(scope, receive, send)
            return
        received = 0
        over = False
        answered = False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    raise _BodyTooLargeError
            return message

        async def answer(message: Message) -> None:
            nonlocal answered
            if over and not answered:
                return  # the app's answer to a body it could not read; 413 goes out below instead
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        # Raised by `counted` only, once `over` is set: the 413 below is then the whole answer.
        with contextlib.suppress(_BodyTooLargeError):
            await self.app(scope, counted, answer)
        if over and not answered:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body larger than {self.limit} bytes"},
            status_code=status.HTTP_413_CONTENT_TOO_LARGE,
        )
        await response(scope, receive, send)


def _declared_length(scope: Scope) -> int | None:
    """The largest Content-Length the request declares; None without one (or a malformed one, counted instead)."""
    lengths = [value for name, value in scope["headers"] if name.lower() == b"content-length"]
    declared = [int(value) for value in lengths if value.strip().isdigit()]
    return max(declared) if declared else None


# --- the app ----------------------------------------------------------------------------------


def create_api(
    settings: ApprovalSettings,
    approvals_view: ApprovalsView,
    publisher: DecisionPublisher,
    clock: Callable[[], datetime],
    *,
    readiness: Readiness | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> FastAPI:
    """The reviewer API over `approvals_view`, publishing decisions with `publisher`, timing them by `clock`."""
    api = FastAPI(
        title="Choreo approvals",
        version="1.0.0",
        summary="Reviewers' decisions on orders at or above the approval threshold.",
        description=(
            "Every `/approvals` route needs `Authorization: Bearer <token>` (the reviewer token). A decision is "
            "checked against the approval's current state, published to `approval.decisions` and answered with "
            "202: its outcome (ApprovalGranted, ApprovalDenied, or ApprovalDecisionIgnored when another decision "
            "won first) follows on `approval.events`."
        ),
        docs_url=None,  # Swagger UI loads its assets from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    api.state.approvals = ApiContext(
        view=approvals_view,
        publisher=publisher,
        clock=clock,
        token=settings.reviewer_token().encode(),
        readiness=readiness,
        tracer=(tracer_provider if tracer_provider is not None else trace.get_tracer_provider()).get_tracer(
            TRACER_NAME
        ),
    )
    api.add_middleware(BodyLimit, limit=int(settings.approval_http_max_body))
    api.add_exception_handler(RequestValidationError, _invalid_request)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.include_router(approvals)
    api.include_router(operations)
    api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return api


PAGE_HEADERS = {
    # Everything the page needs comes from this server; nothing may frame it.
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _bearer(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    token = credentials.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _unauthorized(request: Request) -> HTTPException:
    missing = _bearer(request.headers.get("authorization")) is None
    detail = "missing bearer token: send Authorization: Bearer <token>" if missing else "invalid bearer token"
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def _field_error(item: Any) -> FieldError:
    loc = [part if isinstance(part, int) else str(part) for part in item.get("loc", ())]
    message = str(item.get("msg", "invalid"))
    context = item.get("ctx") or {}
    if item.get("type") == "json_invalid" and "error" in context:
        message = f"{message}: {context['error']}"
    return FieldError(loc=loc, msg=message, type=str(item.get("type", "invalid")))

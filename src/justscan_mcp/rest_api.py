"""The REST front end, `/api/v1`, exactly the guide's endpoints plus the parity routes.

Routes unpack the request, call the service in a worker thread and let the exception handlers
map `justscan_mcp.errors` to status codes: 422 invalid input, 401 no/unknown/revoked key, 403 a
missing scope (named), 404 unknown or another team's id, 409 a conflict, 503 the database is
down. The OpenAPI document is generated from the same pydantic models that validate requests,
with the bearer scheme and each operation's scopes (OpenAPI 3.1 lets a non-OAuth requirement
list role names). The MCP switch of a key does not matter here; scopes do.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Body, FastAPI, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from justscan_mcp import __version__
from justscan_mcp.app import App
from justscan_mcp.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    JustScanError,
    NotFound,
    StoreUnavailable,
    Unauthenticated,
)
from justscan_mcp.events import EmittableEvent
from justscan_mcp.models import (
    DESCRIPTION_MAX_LENGTH,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    MAX_ID,
    URL_MAX_LENGTH,
    DeliveryPage,
    DeliveryPublic,
    EmitResult,
    EventName,
    Principal,
    SecretRotated,
    TestOutcome,
    WebhookCreated,
    WebhookPage,
    WebhookPublic,
)
from justscan_mcp.retry import DeliveryState
from justscan_mcp.service import DEFAULT_ROTATION_GRACE, MAX_ROTATION_GRACE, READ, WRITE

EVENTS_WRITE = "events:write"
log = logging.getLogger("justscan_mcp.rest")


class ErrorBody(BaseModel):
    error: str = Field(description="A short code: invalid_input, unauthenticated, forbidden, not_found, ...")
    message: str = Field(description="What is wrong and what to change.")
    field: str | None = Field(description="The offending input, when one is to blame.")


class _Body(BaseModel):
    # Unknown fields are refused (a typo must not vanish) and types are not coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


class WebhookCreateBody(_Body):
    url: str = Field(min_length=1, max_length=URL_MAX_LENGTH, json_schema_extra={"format": "uri"})
    events: list[EventName] = Field(min_length=1, max_length=4, json_schema_extra={"uniqueItems": True})
    description: str | None = Field(default=None, max_length=DESCRIPTION_MAX_LENGTH)


class WebhookUpdateBody(_Body):
    url: str | None = Field(
        default=None, min_length=1, max_length=URL_MAX_LENGTH, json_schema_extra={"format": "uri"}
    )
    events: list[EventName] | None = Field(
        default=None, min_length=1, max_length=4, json_schema_extra={"uniqueItems": True}
    )
    description: str | None = Field(default=None, max_length=DESCRIPTION_MAX_LENGTH)
    active: bool | None = None


class EventBody(_Body):
    event: EmittableEvent
    data: dict[str, Any]


class RotateBody(_Body):
    grace_seconds: int = Field(default=DEFAULT_ROTATION_GRACE, ge=0, le=MAX_ROTATION_GRACE)


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (401, "No API key, an unknown key or a revoked key."),
        (405, "The endpoint does not take this method."),
        (403, "The key lacks the scope this operation needs (named in the message)."),
        (404, "No such id in the key's team (another team's id answers the same)."),
        (413, "The request body is over 1 MiB."),
        (422, "Invalid input; `field` names it."),
        (500, "A bug on the server; the message says it was logged."),
        (503, "The database is unreachable; try again."),
    )
}

_STATUS: list[tuple[type[JustScanError], int, str]] = [
    (InvalidInput, 422, "invalid_input"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (Unauthenticated, 401, "unauthenticated"),
    (Forbidden, 403, "forbidden"),
    (StoreUnavailable, 503, "unavailable"),
]

WebhookIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="The webhook's id.")]


def error_response(status: int, code: str, message: str, field: str | None) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="justscan"'} if status == 401 else None
    return JSONResponse(
        {"error": code, "message": message, "field": field}, status_code=status, headers=headers
    )


def http_error_response(status: int) -> JSONResponse:
    """Our error shape for the framework's own refusals (no route, wrong method, unreadable body)."""
    if status == 400:  # FastAPI's answer to a body it cannot decode: invalid input like any other
        return error_response(422, "invalid_input", "body: is not valid JSON (UTF-8)", "body")
    if status == 404:
        return error_response(404, "not_found", "no such endpoint; see /api/v1/openapi.json", None)
    if status == 405:
        return error_response(405, "method_not_allowed", "this endpoint does not take that method", None)
    return error_response(status, "error", "the request could not be handled", None)


def _field_of(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not isinstance(p, int)]
    if parts and parts[0] in ("body", "path", "query", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="An API key (jsi_...). Scopes: webhooks:read, webhooks:write, events:write.",
)


async def _call(fn: Any, /, **kwargs: Any) -> Any:
    return await anyio.to_thread.run_sync(partial(fn, **kwargs))


async def _caller(
    request: Request,
    security_scopes: SecurityScopes,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> Principal:
    """Authenticate the bearer key and check the operation's scopes (the MCP switch does not apply)."""
    service = request.app.state.justscan.service
    principal: Principal = await _call(
        service.authenticate, raw_key=credentials.credentials if credentials else None
    )
    for scope in security_scopes.scopes:
        service.require_scope(principal, scope, "this operation")
    return principal


Reader = Annotated[Principal, Security(_caller, scopes=[READ])]
Writer = Annotated[Principal, Security(_caller, scopes=[WRITE])]
Emitter = Annotated[Principal, Security(_caller, scopes=[EVENTS_WRITE])]
Limit = Annotated[int, Query(ge=1, le=LIST_LIMIT_MAX, description="Items per page, 1 to 100.")]
Cursor = Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page.")]


def build_rest_api(app: App) -> FastAPI:
    """The `/api/v1` application (mount it at that prefix)."""
    service = app.service
    api = FastAPI(
        title="Just Scan It webhooks API",
        version=__version__,
        description="Manage a team's webhooks and read their delivery log. Authenticate with "
        "`Authorization: Bearer jsi_...`; each operation lists the scopes it needs.",
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
        responses=ERRORS,
    )
    api.state.justscan = app
    call = _call

    @api.exception_handler(JustScanError)
    async def on_error(request: Request, exc: JustScanError) -> JSONResponse:
        for cls, status, code in _STATUS:
            if isinstance(exc, cls):
                message = StoreUnavailable.PUBLIC if isinstance(exc, StoreUnavailable) else exc.message
                return error_response(status, code, message, getattr(exc, "field", None))
        return error_response(500, "internal", "unexpected error", None)

    @api.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug: the caller still gets the documented JSON shape (Starlette's default is plain
        # text); the traceback goes to the log, never to the caller.
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", "unexpected error; it was logged on the server", None)

    @api.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error_response(exc.status_code)

    @api.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = _field_of(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid")
        if first.get("type") == "extra_forbidden":
            message = "is not a field of this request"
        elif first.get("type") == "json_invalid":
            field, message = "body", "is not valid JSON"
        return error_response(422, "invalid_input", f"{field}: {message}", field)

    @api.get("/webhooks", response_model=WebhookPage, summary="List webhooks", tags=["webhooks"])
    async def list_webhooks(
        principal: Reader, cursor: Cursor = None, limit: Limit = LIST_LIMIT_DEFAULT
    ) -> Any:
        return await call(service.list_webhooks, principal=principal, cursor=cursor, limit=limit)

    @api.post(
        "/webhooks",
        response_model=WebhookCreated,
        status_code=201,
        summary="Create a webhook",
        tags=["webhooks"],
    )
    async def create_webhook(principal: Writer, body: WebhookCreateBody) -> Any:
        return await call(
            service.create_webhook,
            principal=principal,
            url=body.url,
            events=body.events,
            description=body.description,
        )

    @api.get(
        "/webhooks/{webhook_id}", response_model=WebhookPublic, summary="Get a webhook", tags=["webhooks"]
    )
    async def get_webhook(principal: Reader, webhook_id: WebhookIdPath) -> Any:
        return await call(service.get_webhook, principal=principal, webhook_id=webhook_id)

    @api.put(
        "/webhooks/{webhook_id}", response_model=WebhookPublic, summary="Update a webhook", tags=["webhooks"]
    )
    async def update_webhook(principal: Writer, webhook_id: WebhookIdPath, body: WebhookUpdateBody) -> Any:
        changes = {name: getattr(body, name) for name in body.model_fields_set}
        return await call(service.update_webhook, principal=principal, webhook_id=webhook_id, changes=changes)

    @api.delete("/webhooks/{webhook_id}", status_code=204, summary="Delete a webhook", tags=["webhooks"])
    async def delete_webhook(principal: Writer, webhook_id: WebhookIdPath) -> Response:
        await call(service.delete_webhook, principal=principal, webhook_id=webhook_id)
        return Response(status_code=204)

    @api.get(
        "/webhooks/{webhook_id}/deliveries",
        response_model=DeliveryPage,
        summary="A webhook's delivery log",
        tags=["deliveries"],
    )
    async def list_deliveries(
        principal: Reader,
        webhook_id: WebhookIdPath,
        state: Annotated[DeliveryState | None, Query(description="Only deliveries in this state.")] = None,
        cursor: Cursor = None,
        limit: Limit = LIST_LIMIT_DEFAULT,
    ) -> Any:
        return await call(
            service.list_deliveries,
            principal=principal,
            webhook_id=webhook_id,
            state=state,
            cursor=cursor,
            limit=limit,
        )

    @api.post(
        "/webhooks/{webhook_id}/test",
        response_model=TestOutcome,
        summary="Send a test delivery",
        tags=["deliveries"],
    )
    async def test_webhook(principal: Writer, webhook_id: WebhookIdPath) -> Any:
        return await app.send_test_and_wait(principal=principal, webhook_id=webhook_id)

    @api.post(
        "/webhooks/{webhook_id}/rotate-secret",
        response_model=SecretRotated,
        summary="Rotate the signing secret",
        tags=["webhooks"],
    )
    async def rotate_secret(
        principal: Writer, webhook_id: WebhookIdPath, body: Annotated[RotateBody | None, Body()] = None
    ) -> Any:
        grace = body.grace_seconds if body is not None else DEFAULT_ROTATION_GRACE
        return await call(
            service.rotate_secret, principal=principal, webhook_id=webhook_id, grace_seconds=grace
        )

    @api.post(
        "/deliveries/{delivery_id}/redeliver",
        response_model=DeliveryPublic,
        status_code=201,
        summary="Send a past delivery's event again",
        tags=["deliveries"],
    )
    async def redeliver(
        principal: Writer, delivery_id: Annotated[int, Path(ge=1, le=MAX_ID, description="A delivery id.")]
    ) -> Any:
        return await call(service.redeliver, principal=principal, delivery_id=delivery_id)

    @api.post(
        "/events", response_model=EmitResult, status_code=202, summary="Record an event", tags=["events"]
    )
    async def emit_event(principal: Emitter, body: EventBody) -> Any:
        return await call(service.emit_event_as, principal=principal, event=body.event, data=body.data)

    return api

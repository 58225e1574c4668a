"""The REST front end, `/api/v1`, exactly the guide's endpoints plus the parity routes.

Every route is added in a loop from the operation table (`service.operations`): its path,
method, status, scope and response model, with path parameters and the query string or body
taken from the operation's input model. A route unpacks the request, calls `invoke`, and lets the
exception handlers map `justscan_mcp.errors` through the one table (`errors.http_status`): 422
invalid input, 401 no/unknown/revoked key, 403 a missing scope (named), 404 unknown or another
team's id, 409 a conflict, 503 the database is down. The OpenAPI document is generated from the same pydantic models that validate requests,
with the bearer scheme and each operation's scopes (OpenAPI 3.1 lets a non-OAuth requirement
list role names). The MCP switch of a key does not matter here; scopes do.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Body, FastAPI, Header, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from pydantic import BaseModel, Field, ValidationError
from pydantic.fields import FieldInfo
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from justscan_mcp import __version__
from justscan_mcp.app import App
from justscan_mcp.errors import JustScanError, MissingScope, Overloaded, http_status, public_message
from justscan_mcp.groupcommit import GroupCommit
from justscan_mcp.inputs import EventEmit, SecretRotation, WebhookCreate, WebhookUpdate, field_type
from justscan_mcp.models import EmitResult, Principal
from justscan_mcp.service import Service
from justscan_mcp.service.events import IngestRequest
from justscan_mcp.service.operations import OPERATIONS, Operation, invoke
from justscan_mcp.threads import in_thread

log = logging.getLogger("justscan_mcp.rest")


class ErrorBody(BaseModel):
    error: str = Field(description="A short code: invalid_input, unauthenticated, forbidden, not_found, ...")
    message: str = Field(description="What is wrong and what to change.")
    field: str | None = Field(description="The offending input, when one is to blame.")


# The request bodies under the names this API has always published in its OpenAPI document; the
# models (and every field rule) are `justscan_mcp.inputs`'.
BODY_NAMES: dict[type[BaseModel], str] = {
    WebhookCreate: "WebhookCreateBody",
    WebhookUpdate: "WebhookUpdateBody",
    SecretRotation: "RotateBody",
    EventEmit: "EventBody",
}
_BODIES: dict[type[BaseModel], type[BaseModel]] = {
    model: type(name, (model,), {"__module__": __name__}) for model, name in BODY_NAMES.items()
}

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (401, "No API key, an unknown key or a revoked key."),
        (405, "The endpoint does not take this method."),
        (403, "The key lacks the scope this operation needs (named in the message)."),
        (404, "No such id in the key's team (another team's id answers the same)."),
        (409, "A conflict: an inactive webhook, an Idempotency-Key used with another request, a race."),
        (413, "The request body is over 1 MiB."),
        (422, "Invalid input; `field` names it."),
        (500, "A bug on the server; the message says it was logged."),
        (503, "The database is unreachable; try again."),
    )
}


def error_response(status: int, code: str, message: str, field: str | None) -> JSONResponse:
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="justscan"'}
    elif status == 429:
        headers = {"Retry-After": str(Overloaded.RETRY_AFTER)}
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


def validation_response(errors: Any) -> JSONResponse:
    """422 for the first of pydantic's errors (locations as FastAPI gives them, `body` first)."""
    first = errors[0]
    field = _field_of(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid")
    if first.get("type") == "extra_forbidden":
        message = "is not a field of this request"
    elif first.get("type") == "json_invalid":
        field, message = "body", "is not valid JSON"
    return error_response(422, "invalid_input", f"{field}: {message}", field)


BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="An API key (jsi_...). Scopes: webhooks:read, webhooks:write, events:write.",
)


async def _caller(
    request: Request,
    security_scopes: SecurityScopes,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> Principal:
    """Authenticate the bearer key, and refuse a key without the operation's scope before its
    body is read (the MCP switch does not apply here). The scopes come from the operation table,
    and `invoke` checks the same declaration again."""
    service = request.app.state.justscan.service
    principal: Principal = await in_thread(
        service.authenticate, credentials.credentials if credentials else None
    )
    route = request.scope.get("route")
    for scope in security_scopes.scopes:
        if not principal.has(scope):
            raise MissingScope(scope, getattr(route, "name", None) or "this operation")
    return principal


_PATH_PARAM = re.compile(r"{(\w+)}")


def _described(info: FieldInfo, source: Callable[..., Any]) -> Any:
    """An input-model field as a FastAPI parameter: its type and constraints, from `source`
    (Path or Query), with its description."""
    return field_type(info, source(description=info.description))


def _endpoint(op: Operation, service: Service) -> Callable[..., Awaitable[Any]]:
    """The route function of an operation: path parameters and the query string (or the body)
    from its input model, the caller (with the declared scope) from the bearer key."""
    route = op.route
    in_path = _PATH_PARAM.findall(route.path)
    fields = op.input.model_fields
    params = [
        inspect.Parameter(
            "principal",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[Principal, Security(_caller, scopes=[op.scope])],
        )
    ]
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=_described(fields[name], Path))
        for name in in_path
    ]
    params += [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=field_type(fields[name], Header(alias=header, description=fields[name].description)),
        )
        for name, header in route.headers.items()
    ]
    if route.body is not None:
        body = _BODIES.get(route.body, route.body)
        if route.body_required:
            params.append(inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=body))
        else:
            params.append(
                inspect.Parameter(
                    "body",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[body | None, Body()],
                )
            )
    else:
        params += [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=info.default,
                annotation=_described(info, Query),
            )
            for name, info in fields.items()
            if name not in in_path and name not in route.headers
        ]

    async def endpoint(*, principal: Principal, **given: Any) -> Any:
        body = given.pop("body", None)
        args = {name: value for name, value in given.items() if value is not None}
        if body is not None:
            # Only the fields the caller sent: for a PUT, what is left out stays as it is.
            args.update({name: getattr(body, name) for name in body.model_fields_set})
        result = await invoke(service, op.name, principal=principal, args=args)
        if route.status == 204:
            return Response(status_code=204)
        sent = {
            header: "true" for header, attr in route.reply_headers.items() if getattr(result, attr, False)
        }
        # Serialised here, once: FastAPI would validate the result against the response model
        # again first (for a batch of 1,000 events, a second pass over every item).
        return Response(
            result.model_dump_json(), status_code=route.status, media_type="application/json", headers=sent
        )

    endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    endpoint.__name__ = op.name
    return endpoint


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

    @api.exception_handler(JustScanError)
    async def on_error(request: Request, exc: JustScanError) -> JSONResponse:
        status, code = http_status(exc)
        return error_response(status, code, public_message(exc), getattr(exc, "field", None))

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
        return validation_response(exc.errors())

    for op in OPERATIONS:
        route = op.route
        api.add_api_route(
            route.path,
            _endpoint(op, service),
            methods=[route.method],
            name=op.name,
            summary=op.title,
            tags=[route.tag],
            status_code=route.status,
            response_model=None if route.status == 204 else op.output,
            response_class=Response if route.status == 204 else JSONResponse,
        )

    return api


# --- the ingest fast path -------------------------------------------------------------------

API_PREFIX = "/api/v1"  # where http_server mounts this API
API_EVENTS = API_PREFIX + "/events"


class FastIngest:
    """`POST /api/v1/events` without an Idempotency-Key, the path a QR campaign's scans take:
    answered here instead of through FastAPI, and recorded through the group commit, so that
    concurrent requests share one transaction (and one key lookup per distinct key). The
    answers are the route's own, byte for byte: 202 `{"event_id", "deliveries"}` once
    committed, and the same errors (401, 403 naming events:write, 422 naming the field, 503),
    plus 429 with Retry-After when too many events wait. Everything else passes through."""

    def __init__(self, api: ASGIApp, justscan: App) -> None:
        self.api = api
        self.service = justscan.service
        self.commit: GroupCommit[IngestRequest, EmitResult | JustScanError] = GroupCommit(
            # One batch in flight on both databases. PostgreSQL had two, so one batch's round
            # trips would hide the other's (median 1,918/s with one writer against 2,081/s with
            # two, when a batch took eight round trips); with four, a batch's fixed cost (0.7 ms
            # of CPU for one event, 1.1 ms for twenty) is what counts, and one writer's bigger
            # batches pay it less often: 2,990 to 3,075/s against 2,619 to 2,690/s in five
            # alternated pairs, p99 8.3 to 9.2 ms against 11.5 to 14.6 (20 clients).
            self.service.ingest,
            writers=1,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in (API_EVENTS, "/events")
            or any(name == b"idempotency-key" for name, _ in scope["headers"])
        ):
            await self.api(scope, receive, send)
            return
        raw_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                raw_key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
                break
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        response: Response
        # Parsed as the FastAPI route parses it (json.loads, then the model), so the answers
        # match: a lone surrogate escape reaches the event's own check and is named there.
        problem: JSONResponse | None = None
        try:
            emit = EventEmit.model_validate(json.loads(body))
        except UnicodeDecodeError:
            problem = http_error_response(400)
        except json.JSONDecodeError:
            problem = validation_response([{"type": "json_invalid", "loc": ("body",), "msg": "invalid"}])
        except ValidationError as exc:
            problem = validation_response([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
        if problem is not None:
            # As the route answers: a refused key first, then the body's first problem.
            response = await self._refusal(raw_key) or problem
            await response(scope, receive, send)
            return
        try:
            result = await self.commit.submit(IngestRequest(raw_key, emit.event, emit.data))
        except JustScanError as exc:
            result = exc
        if isinstance(result, JustScanError):
            status, code = http_status(result)
            response = error_response(status, code, public_message(result), getattr(result, "field", None))
        else:
            response = Response(result.model_dump_json(), status_code=202, media_type="application/json")
        await response(scope, receive, send)

    async def _refusal(self, raw_key: str | None) -> JSONResponse | None:
        """The answer for a key that may not emit events, or None."""
        try:
            principal = await in_thread(self.service.authenticate, raw_key)
            if not principal.has("events:write"):
                raise MissingScope("events:write", "emit_event")
        except JustScanError as exc:
            status, code = http_status(exc)
            return error_response(status, code, public_message(exc), getattr(exc, "field", None))
        return None

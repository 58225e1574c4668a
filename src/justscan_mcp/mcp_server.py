"""The MCP front end: tools over the service, gated per API key.

Gating happens in one server middleware for every transport:
- the caller's key id comes from the transport (the stdio key resolved at start, or the bearer
  key that `http_server` authenticated for this HTTP request);
- the key's state is re-read from the database on every `tools/list` and `tools/call`, so
  revoking it, switching MCP off or changing scopes takes effect on the next call;
- `tools/list` shows only the tools the key's scopes allow; calling another names the scope.
The service checks scopes again: it is the authority, the middleware makes the surface honest.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from mcp import MCPError
from mcp.server import MCPServer
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from justscan_mcp import __version__
from justscan_mcp.app import App
from justscan_mcp.errors import AuthError, JustScanError, StoreUnavailable, Unauthenticated
from justscan_mcp.models import (
    DESCRIPTION_MAX_LENGTH,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    URL_MAX_LENGTH,
    DeliveryPage,
    DeliveryPublic,
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

T = TypeVar("T")

TOOL_SCOPES: dict[str, str] = {
    "create_webhook": WRITE,
    "list_webhooks": READ,
    "delete_webhook": WRITE,
    "test_webhook": WRITE,
    "list_deliveries": READ,
    "get_webhook": READ,
    "update_webhook": WRITE,
    "redeliver": WRITE,
    "rotate_secret": WRITE,
}
"""The scope each tool needs; a tool missing here is refused to everyone (fail closed)."""

# JSON-RPC error codes for calls the key may not make at all (not tool errors: no tool ran).
UNAUTHENTICATED_CODE = -32001
FORBIDDEN_CODE = -32003

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "justscan_principal", default=None
)

INSTRUCTIONS = """\
Manage Just Scan It webhooks for the team your API key belongs to. A webhook is an https URL that
receives signed POST requests when QR-code events happen (scan, first_scan, form_submit,
file_download). Use list_webhooks to see existing webhooks and their ids, create_webhook to add one
(its signing secret is shown only in that result: tell the user to store it), delete_webhook to
remove one, test_webhook to send a signed test delivery and see the receiver's answer, and
list_deliveries to read a webhook's delivery log (states, attempts, response codes, retries),
get_webhook and update_webhook to inspect or change one (url, events, description, active),
redeliver to send a past delivery's event again, and rotate_secret to issue a new signing secret.
Errors say which argument to change."""


class WebhookDeleted(BaseModel):
    deleted: bool = Field(description="Always true: the webhook no longer exists.")
    webhook_id: int


READING = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
"""Annotations of every tool that only reads our own store."""

Cursor = Annotated[
    str | None,
    Field(max_length=512, description="next_cursor from the previous page; omit for the first page."),
]


WebhookLimit = Annotated[int, Field(ge=1, le=LIST_LIMIT_MAX, description="Webhooks per page, 1 to 100.")]
DeliveryLimit = Annotated[int, Field(ge=1, le=LIST_LIMIT_MAX, description="Deliveries per page, 1 to 100.")]

WebhookId = Annotated[
    int, Field(ge=1, description="The webhook's id, as returned by create_webhook or list_webhooks.")
]


EXCERPT_CHARS = 1024


def receiver_excerpt(body: str | None) -> str | None:
    """A receiver's response body as a model should see it: third-party text, so only a short
    excerpt, fenced and labelled as the receiver's words (never instructions). REST and the
    dashboard keep the whole 16 KiB."""
    if body is None:
        return None
    cut = len(body) > EXCERPT_CHARS
    more = f", first {EXCERPT_CHARS} of {len(body)} characters" if cut else ""
    return f"<receiver-response{more}>\n{body[:EXCERPT_CHARS]}\n</receiver-response>"


def current_principal() -> Principal:
    principal = _principal.get()
    if principal is None:  # only reachable if a tool is called around the middleware
        raise ToolError("no API key is attached to this call")
    return principal


def _tool_error(exc: JustScanError) -> ToolError:
    """The sentence the model reads for an error (never the driver's words for a database outage)."""
    return ToolError(StoreUnavailable.PUBLIC if isinstance(exc, StoreUnavailable) else exc.message)


async def _call(fn: Callable[..., T], /, **kwargs: Any) -> T:
    """Run a service call in a worker thread and turn its errors into sentences for the model."""
    try:
        return await anyio.to_thread.run_sync(lambda: fn(**kwargs))
    except JustScanError as exc:
        raise _tool_error(exc) from exc


def _refusal(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


def _allowed(principal: Principal, tool_name: str) -> bool:
    scope = TOOL_SCOPES.get(tool_name)
    return scope is not None and principal.has(scope)


def _filter_tools(result: Any, principal: Principal) -> Any:
    """Keep the tools the key's scopes allow (the SDK hands either a model or its dict form)."""
    if isinstance(result, dict):
        return {**result, "tools": [t for t in result["tools"] if _allowed(principal, t["name"])]}
    result.tools = [t for t in result.tools if _allowed(principal, t.name)]
    return result


def build_mcp_server(app: App, *, fixed_key_id: int | None = None) -> MCPServer[Any]:
    """The MCP server for `app`.

    Args:
        fixed_key_id: the key every call acts as (stdio, in-memory tests). Without it the key
            comes from the HTTP request's bearer token, which `http_server` authenticates.
    """
    service = app.service
    server: MCPServer[Any] = MCPServer(
        "justscan-webhooks",
        title="Just Scan It webhooks",
        instructions=INSTRUCTIONS,
        version=__version__,
        website_url="https://justscanit.com",
    )

    async def resolve() -> Principal:
        key_id = fixed_key_id
        if key_id is None:
            token = get_access_token()
            claims = token.claims if token is not None else None
            if not claims or not isinstance(claims.get("key_id"), int):
                raise MCPError(UNAUTHENTICATED_CODE, "no API key: send Authorization: Bearer jsi_...")
            key_id = claims["key_id"]
        try:
            principal = await anyio.to_thread.run_sync(service.principal_for_key_id, key_id)
            service.require_mcp(principal)
        except AuthError as exc:
            code = UNAUTHENTICATED_CODE if isinstance(exc, Unauthenticated) else FORBIDDEN_CODE
            raise MCPError(code, exc.message) from exc
        except StoreUnavailable as exc:
            raise MCPError(-32603, StoreUnavailable.PUBLIC) from exc
        return principal

    async def gate(ctx: ServerRequestContext[Any, Any], call_next: Callable[..., Awaitable[Any]]) -> Any:
        # Every request re-reads the key (revoked, MCP switched off), not only tool calls: over
        # SSE the HTTP layer can only identify the key of a message, and a revoked key must not
        # keep talking to its open session.
        principal = await resolve()
        if ctx.method not in ("tools/list", "tools/call"):
            return await call_next(ctx)
        if ctx.method == "tools/list":
            return _filter_tools(await call_next(ctx), principal)
        name = (ctx.params or {}).get("name")
        scope = TOOL_SCOPES.get(str(name))
        if scope is None:
            return await call_next(ctx)  # unknown tool: let the SDK say so
        if not principal.has(scope):
            return _refusal(
                f"{name} needs the '{scope}' scope, which this API key lacks; "
                f"ask for a key with '{scope}' (justscan-mcp key update ID --scopes ...)"
            )
        token = _principal.set(principal)
        try:
            return await call_next(ctx)
        finally:
            _principal.reset(token)

    server.middleware.append(gate)

    @server.tool(
        title="Create webhook",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False
        ),
    )
    async def create_webhook(
        url: Annotated[
            str,
            Field(
                min_length=1,
                max_length=URL_MAX_LENGTH,
                description="Absolute https:// URL that will receive the POST requests. It must "
                "resolve to a public address.",
                json_schema_extra={"format": "uri"},
            ),
        ],
        events: Annotated[
            list[EventName],
            Field(
                min_length=1,
                max_length=4,
                description="Events to subscribe to, each at most once: scan, first_scan (only the "
                "first scan of each QR code), form_submit, file_download.",
                json_schema_extra={"uniqueItems": True},
            ),
        ],
        description: Annotated[
            str | None,
            Field(max_length=DESCRIPTION_MAX_LENGTH, description="Optional note shown to people."),
        ] = None,
    ) -> WebhookCreated:
        """Create a webhook for your team that receives signed POSTs for the chosen events.

        The result includes `secret`, the signing key for the X-Webhook-Signature header. It is
        shown only here: give it to the user to store with their receiver.
        """
        return await _call(
            service.create_webhook,
            principal=current_principal(),
            url=url,
            events=events,
            description=description,
        )

    @server.tool(
        title="List webhooks",
        annotations=READING,
    )
    async def list_webhooks(
        cursor: Cursor = None,
        limit: WebhookLimit = LIST_LIMIT_DEFAULT,
    ) -> WebhookPage:
        """List your team's webhooks, oldest first, one page at a time (secrets are not shown).

        When `next_cursor` is not null, call again with it to get the next page.
        """
        return await _call(service.list_webhooks, principal=current_principal(), cursor=cursor, limit=limit)

    @server.tool(
        title="Delete webhook",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
        ),
    )
    async def delete_webhook(webhook_id: WebhookId) -> WebhookDeleted:
        """Delete one of your team's webhooks permanently; it stops receiving events at once."""
        await _call(service.delete_webhook, principal=current_principal(), webhook_id=webhook_id)
        return WebhookDeleted(deleted=True, webhook_id=webhook_id)

    @server.tool(
        title="Send test delivery",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
        ),
    )
    async def test_webhook(webhook_id: WebhookId) -> TestOutcome:
        """Send one signed `test` event to the webhook's URL and return what the receiver did.

        Works whatever events the webhook subscribes to. The result has the delivery's state
        (succeeded or failed; pending if no dispatcher took it in time), the HTTP status code,
        the duration, the start of the response body and any error. It is logged like any
        delivery and is not retried.
        """
        try:
            outcome = await app.send_test_and_wait(principal=current_principal(), webhook_id=webhook_id)
        except JustScanError as exc:
            raise _tool_error(exc) from exc
        return outcome.model_copy(update={"response_body": receiver_excerpt(outcome.response_body)})

    @server.tool(
        title="List deliveries",
        annotations=READING,
    )
    async def list_deliveries(
        webhook_id: WebhookId,
        state: Annotated[
            DeliveryState | None,
            Field(description="Only deliveries in this state: pending, retrying, succeeded or failed."),
        ] = None,
        cursor: Cursor = None,
        limit: DeliveryLimit = LIST_LIMIT_DEFAULT,
    ) -> DeliveryPage:
        """A webhook's delivery log, newest first: each delivery's event, state and next retry
        time, and every attempt with its time, duration, HTTP status code, an excerpt of the
        receiver's response body (its first 1 KiB, marked as the receiver's text) and error.
        Failed deliveries are retried after 1, 5 and 30 minutes."""
        page = await _call(
            service.list_deliveries,
            principal=current_principal(),
            webhook_id=webhook_id,
            state=state,
            cursor=cursor,
            limit=limit,
        )
        for delivery in page.deliveries:
            for attempt in delivery.attempts:
                attempt.response_body = receiver_excerpt(attempt.response_body)
        return page

    @server.tool(
        title="Get webhook",
        annotations=READING,
    )
    async def get_webhook(webhook_id: WebhookId) -> WebhookPublic:
        """One of your team's webhooks: URL, events, description, whether it is active, and times.
        The secret is not shown (rotate_secret issues a new one)."""
        return await _call(service.get_webhook, principal=current_principal(), webhook_id=webhook_id)

    @server.tool(
        title="Update webhook",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
        ),
    )
    async def update_webhook(
        webhook_id: WebhookId,
        url: Annotated[
            str | None,
            Field(
                min_length=1,
                max_length=URL_MAX_LENGTH,
                description="New https:// URL (must resolve to a public address).",
                json_schema_extra={"format": "uri"},
            ),
        ] = None,
        events: Annotated[
            list[EventName] | None,
            Field(
                min_length=1,
                max_length=4,
                description="New event list, replacing the old one; each event at most once.",
                json_schema_extra={"uniqueItems": True},
            ),
        ] = None,
        description: Annotated[
            str | None,
            Field(max_length=DESCRIPTION_MAX_LENGTH, description="New note; an empty string clears it."),
        ] = None,
        active: Annotated[
            bool | None,
            Field(description="false pauses the webhook: it receives nothing and its queued deliveries end."),
        ] = None,
    ) -> WebhookPublic:
        """Change a webhook: give only the fields to change. Each is checked as strictly as in
        create_webhook. Setting active to false stops all deliveries to it."""
        changes: dict[str, Any] = {}
        if url is not None:
            changes["url"] = url
        if events is not None:
            changes["events"] = events
        if description is not None:
            changes["description"] = description or None
        if active is not None:
            changes["active"] = active
        return await _call(
            service.update_webhook, principal=current_principal(), webhook_id=webhook_id, changes=changes
        )

    @server.tool(
        title="Redeliver",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
        ),
    )
    async def redeliver(
        delivery_id: Annotated[
            int,
            Field(ge=1, description="A delivery id from list_deliveries whose event should be sent again."),
        ],
    ) -> DeliveryPublic:
        """Send a past delivery's event to its webhook again, as a new delivery linked to the
        original (redelivery_of). Use it after fixing a receiver that failed. The new delivery is
        retried on the usual schedule; follow it with list_deliveries."""
        return await _call(service.redeliver, principal=current_principal(), delivery_id=delivery_id)

    @server.tool(
        title="Rotate secret",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=False
        ),
    )
    async def rotate_secret(
        webhook_id: WebhookId,
        grace_seconds: Annotated[
            int,
            Field(
                ge=0,
                le=MAX_ROTATION_GRACE,
                description="How long the old secret keeps signing beside the new one (webhook-signature), "
                "in seconds; default 86400 (24 h), 0 ends it at once.",
            ),
        ] = DEFAULT_ROTATION_GRACE,
    ) -> SecretRotated:
        """Issue a new signing secret for a webhook and return it (shown only here: give it to the
        user). X-Webhook-Signature uses the new secret at once; the Standard Webhooks
        webhook-signature header carries both signatures until the grace period ends."""
        return await _call(
            service.rotate_secret,
            principal=current_principal(),
            webhook_id=webhook_id,
            grace_seconds=grace_seconds,
        )

    return server

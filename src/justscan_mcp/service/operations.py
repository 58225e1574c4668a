"""The operation table (every operation, declared once) and `invoke`, the one gate of the front ends.

An operation names its use case (a `Service` method), the scope it needs, what it takes (an input
model from `justscan_mcp.inputs`) and what it gives back, its hints for models, and where REST
serves it. The MCP tools are registered from this table in a loop, the REST routes take their
path, scope, response model and OpenAPI security from it, and the dashboard's actions run
through `invoke` by operation name. Adding an operation is one entry here and one use-case method.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from justscan_mcp.errors import MissingScope
from justscan_mcp.inputs import (
    DeliveryLogQuery,
    DeliveryRecovery,
    DeliveryRecoveryInput,
    DeliveryRef,
    EventBatch,
    EventBatchInput,
    EventEmit,
    EventEmitInput,
    SecretRotation,
    SecretRotationInput,
    WebhookChange,
    WebhookCreate,
    WebhookPageQuery,
    WebhookRef,
    WebhookStatsQuery,
    WebhookUpdate,
)
from justscan_mcp.models import (
    BatchEmitResult,
    Caller,
    DeliveryPage,
    DeliveryPublic,
    EmitResult,
    RecoveryResult,
    Scope,
    SecretRotated,
    TestOutcome,
    WebhookCreated,
    WebhookDeleted,
    WebhookPage,
    WebhookPublic,
    WebhookStats,
)
from justscan_mcp.threads import in_thread

if TYPE_CHECKING:
    from justscan_mcp.service import Service

READ: Scope = "webhooks:read"
WRITE: Scope = "webhooks:write"
EVENTS_WRITE: Scope = "events:write"


@dataclass(frozen=True)
class Hints:
    """What the operation does to the world, for clients that ask before acting (MCP
    annotations): only reads, may destroy or overwrite, safe to repeat, reaches outside."""

    read_only: bool
    destructive: bool
    idempotent: bool
    open_world: bool


READS = Hints(read_only=True, destructive=False, idempotent=True, open_world=False)


@dataclass(frozen=True)
class HttpRoute:
    """Where REST serves an operation. Path parameters are input fields named in `path`; `body`
    carries the rest of the input, or the query string does when there is no body."""

    method: str
    path: str
    status: int = 200
    body: type[BaseModel] | None = None
    body_required: bool = True
    tag: str = "webhooks"
    # Input fields REST reads from request headers: {field: header name}.
    headers: Mapping[str, str] = field(default_factory=dict)
    # Response headers from the result: {header name: result attribute}, sent when it is true.
    reply_headers: Mapping[str, str] = field(default_factory=dict)


def _same(args: dict[str, Any]) -> dict[str, Any]:
    return args


@dataclass(frozen=True)
class Operation:
    name: str
    title: str
    description: str
    scope: Scope
    hints: Hints
    input: type[BaseModel]
    output: type[BaseModel]
    use_case: str
    route: HttpRoute
    mcp_tool: bool = True
    # From the input's fields to the use case's keywords, where they differ.
    arguments: Callable[[dict[str, Any]], dict[str, Any]] = field(default=_same)


def _update_arguments(args: dict[str, Any]) -> dict[str, Any]:
    changes = dict(args)
    return {"webhook_id": changes.pop("webhook_id", None), "changes": changes}


CONFIRMATION_NOTE = (
    "\n\nWhen the client supports elicitation, the user is asked to confirm first, naming the webhook "
    "by URL (declining or cancelling changes nothing); clients without it should have their host "
    "confirm, as the destructive hint asks."
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        name="create_webhook",
        title="Create webhook",
        description="Create a webhook for your team that receives signed POSTs for the chosen events.\n\n"
        "The result includes `secret`, the signing key for the X-Webhook-Signature header. It is shown "
        "only here: give it to the user to store with their receiver.",
        scope=WRITE,
        hints=Hints(read_only=False, destructive=False, idempotent=False, open_world=False),
        input=WebhookCreate,
        output=WebhookCreated,
        use_case="create_webhook",
        route=HttpRoute("POST", "/webhooks", 201, body=WebhookCreate),
    ),
    Operation(
        name="list_webhooks",
        title="List webhooks",
        description="List your team's webhooks, oldest first, one page at a time (secrets are not "
        "shown).\n\nWhen `next_cursor` is not null, call again with it to get the next page.",
        scope=READ,
        hints=READS,
        input=WebhookPageQuery,
        output=WebhookPage,
        use_case="list_webhooks",
        route=HttpRoute("GET", "/webhooks"),
    ),
    Operation(
        name="get_webhook",
        title="Get webhook",
        description="One of your team's webhooks: URL, events, description, whether it is active, and "
        "times. The secret is not shown (rotate_secret issues a new one).",
        scope=READ,
        hints=READS,
        input=WebhookRef,
        output=WebhookPublic,
        use_case="get_webhook",
        route=HttpRoute("GET", "/webhooks/{webhook_id}"),
    ),
    Operation(
        name="update_webhook",
        title="Update webhook",
        description="Change a webhook: give only the fields to change. Each is checked as strictly as in "
        "create_webhook. Setting active to false stops all deliveries to it.",
        scope=WRITE,
        hints=Hints(read_only=False, destructive=True, idempotent=True, open_world=False),
        input=WebhookChange,
        output=WebhookPublic,
        use_case="update_webhook",
        route=HttpRoute("PUT", "/webhooks/{webhook_id}", body=WebhookUpdate),
        arguments=_update_arguments,
    ),
    Operation(
        name="delete_webhook",
        title="Delete webhook",
        description="Delete one of your team's webhooks permanently; it stops receiving events at once."
        + CONFIRMATION_NOTE,
        scope=WRITE,
        hints=Hints(read_only=False, destructive=True, idempotent=True, open_world=False),
        input=WebhookRef,
        output=WebhookDeleted,
        use_case="delete_webhook",
        route=HttpRoute("DELETE", "/webhooks/{webhook_id}", 204),
    ),
    Operation(
        name="test_webhook",
        title="Send test delivery",
        description="Send one signed `test` event to the webhook's URL and return what the receiver "
        "did.\n\nWorks whatever events the webhook subscribes to. The result has the delivery's state "
        "(succeeded or failed; pending if no dispatcher took it in time), the HTTP status code, the "
        "duration, the start of the response body and any error. It is logged like any delivery and is "
        "not retried.",
        scope=WRITE,
        hints=Hints(read_only=False, destructive=False, idempotent=False, open_world=True),
        input=WebhookRef,
        output=TestOutcome,
        use_case="test_webhook",
        route=HttpRoute("POST", "/webhooks/{webhook_id}/test", tag="deliveries"),
    ),
    Operation(
        name="list_deliveries",
        title="List deliveries",
        description="A webhook's delivery log, newest first: each delivery's event, state and next retry "
        "time, and every attempt with its time, duration, HTTP status code, an excerpt of the receiver's "
        "response body (its first 1 KiB, marked as the receiver's text) and error. Failed deliveries "
        "are retried after 1, 5 and 30 minutes.",
        scope=READ,
        hints=READS,
        input=DeliveryLogQuery,
        output=DeliveryPage,
        use_case="list_deliveries",
        route=HttpRoute("GET", "/webhooks/{webhook_id}/deliveries", tag="deliveries"),
    ),
    Operation(
        name="get_webhook_stats",
        title="Webhook statistics",
        description="Is this webhook healthy? Over the last `hours` clock hours (default 24, at most "
        "720), counted from the deliveries created then: deliveries by state, attempts by outcome "
        "(2xx, 3xx, 4xx, 5xx, timeout, connection), success_rate (succeeded / finished), attempt "
        "latency p50 and p95 in ms, failing_since (when the current failure streak began, null when "
        "healthy) and succeeded/failed per hour. Follow up with list_deliveries(state='failed') to "
        "see what failed, and recover_deliveries once the receiver is fixed.",
        scope=READ,
        hints=READS,
        input=WebhookStatsQuery,
        output=WebhookStats,
        use_case="get_webhook_stats",
        route=HttpRoute("GET", "/webhooks/{webhook_id}/stats", tag="deliveries"),
    ),
    Operation(
        name="redeliver",
        title="Redeliver",
        description="Send a past delivery's event to its webhook again, as a new delivery linked to the "
        "original (redelivery_of). Use it after fixing a receiver that failed. The new delivery is "
        "retried on the usual schedule; follow it with list_deliveries.",
        scope=WRITE,
        hints=Hints(read_only=False, destructive=False, idempotent=False, open_world=True),
        input=DeliveryRef,
        output=DeliveryPublic,
        use_case="redeliver",
        route=HttpRoute("POST", "/deliveries/{delivery_id}/redeliver", 201, tag="deliveries"),
    ),
    Operation(
        name="rotate_secret",
        title="Rotate secret",
        description="Issue a new signing secret for a webhook and return it (shown only here: give it to "
        "the user). X-Webhook-Signature uses the new secret at once; the Standard Webhooks "
        "webhook-signature header carries both signatures until the grace period ends." + CONFIRMATION_NOTE,
        scope=WRITE,
        hints=Hints(read_only=False, destructive=True, idempotent=False, open_world=False),
        input=SecretRotationInput,
        output=SecretRotated,
        use_case="rotate_secret",
        route=HttpRoute(
            "POST", "/webhooks/{webhook_id}/rotate-secret", body=SecretRotation, body_required=False
        ),
    ),
    Operation(
        name="recover_deliveries",
        title="Recover failed deliveries",
        description="After an outage, re-send every failed delivery of a webhook created since a time "
        "(until another, or now), as new deliveries linked to the originals (redelivery_of). An event "
        "already delivered since, or on its way, is not sent twice, so calling again is safe. "
        "dry_run=true only counts. At most 10,000 per call: when `more` is true, call again with the "
        "same arguments to continue. The webhook must be active." + CONFIRMATION_NOTE,
        scope=WRITE,
        hints=Hints(read_only=False, destructive=False, idempotent=True, open_world=True),
        input=DeliveryRecoveryInput,
        output=RecoveryResult,
        use_case="recover_deliveries",
        route=HttpRoute("POST", "/webhooks/{webhook_id}/recover", body=DeliveryRecovery, tag="deliveries"),
    ),
    Operation(
        name="emit_event",
        title="Record an event",
        description="Record a QR-code event for your team; every active webhook subscribed to it gets a "
        "signed delivery (the first scan of a QR code also makes a first_scan).",
        scope=EVENTS_WRITE,
        hints=Hints(read_only=False, destructive=False, idempotent=False, open_world=True),
        input=EventEmitInput,
        output=EmitResult,
        use_case="emit_event_as",
        route=HttpRoute(
            "POST",
            "/events",
            202,
            body=EventEmit,
            tag="events",
            headers={"idempotency_key": "Idempotency-Key"},
            reply_headers={"Idempotent-Replayed": "replayed"},
        ),
        # Events come from Just Scan It's own systems, not from assistants.
        mcp_tool=False,
    ),
    Operation(
        name="emit_events",
        title="Record a batch of events",
        description="Record 1 to 1,000 events for your team in one request. Each is checked on its own: "
        "the answer lists, per event in order, its id and deliveries or its error, and the valid ones "
        "are recorded even when others are refused. An Idempotency-Key covers the whole request.",
        scope=EVENTS_WRITE,
        hints=Hints(read_only=False, destructive=False, idempotent=False, open_world=True),
        input=EventBatchInput,
        output=BatchEmitResult,
        use_case="emit_events_as",
        route=HttpRoute(
            "POST",
            "/events/batch",
            202,
            body=EventBatch,
            tag="events",
            headers={"idempotency_key": "Idempotency-Key"},
            reply_headers={"Idempotent-Replayed": "replayed"},
        ),
        mcp_tool=False,
    ),
)

BY_NAME: Mapping[str, Operation] = {op.name: op for op in OPERATIONS}
TOOL_SCOPES: Mapping[str, Scope] = {op.name: op.scope for op in OPERATIONS if op.mcp_tool}
"""The scope each MCP tool needs; a tool missing here is refused to everyone (fail closed)."""


def authorize(op: Operation, principal: Caller) -> None:
    """Raises: MissingScope naming the operation's scope."""
    if not principal.has(op.scope):
        raise MissingScope(op.scope, op.name)


async def invoke(service: Service, name: str, *, principal: Caller, args: Mapping[str, Any]) -> Any:
    """Run operation `name` for `principal`: check its scope, then its use case, off the event
    loop when it is synchronous. The use case validates `args` with the operation's input model.

    Raises:
        MissingScope, and whatever the use case raises (all `JustScanError`).
    """
    op = BY_NAME[name]
    authorize(op, principal)
    fn = getattr(service, op.use_case)
    kwargs = op.arguments(dict(args))
    if inspect.iscoroutinefunction(fn):
        return await fn(principal=principal, **kwargs)
    return await in_thread(fn, principal=principal, **kwargs)

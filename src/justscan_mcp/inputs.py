"""What callers may send: every field rule once, as pydantic input models.

The service validates with these models (`parse`); the MCP tools' input schemas and the REST
API's OpenAPI document are generated from the same models, so a limit changed here changes all
three. Models are strict (no "7" for 7, no true for 1) and refuse unknown fields, so a typo never
vanishes. Errors become `InvalidInput` naming the field, in our words rather than pydantic's.

Families (full-stack-fastapi-template's convention): `WebhookCreate` / `WebhookUpdate` are the
bodies; the `*Input` models are one operation's whole argument list (ids, filters, paging).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WrapValidator,
)
from pydantic.fields import FieldInfo

from justscan_mcp.errors import InvalidInput
from justscan_mcp.events import EmittableEvent
from justscan_mcp.models import (
    BATCH_MAX,
    DESCRIPTION_MAX_LENGTH,
    EVENT_NAMES,
    IDEMPOTENCY_KEY_MAX,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    MAX_ID,
    URL_MAX_LENGTH,
    EventName,
)
from justscan_mcp.ratelimit import RATE_LIMIT_MAX, RATE_LIMIT_MIN
from justscan_mcp.retry import DeliveryState

DEFAULT_ROTATION_GRACE = 24 * 3600
MAX_ROTATION_GRACE = 7 * 24 * 3600
CURSOR_MAX_LENGTH = 512

M = TypeVar("M", bound=BaseModel)


def normalise_description(value: str | None) -> str | None:
    """The one normalisation of a description, for every front end: surrounding whitespace goes,
    and an empty note is no note (None)."""
    if value is None:
        return None
    return value.strip() or None


def _distinct_events(events: list[str]) -> list[str]:
    seen: list[str] = []
    for name in events:
        if name in seen:
            raise ValueError(f"{name!r} is listed twice; list each event once")
        seen.append(name)
    return seen


# Constraints on the types; descriptions on the fields that use them (an optional field's own
# description would otherwise be repeated inside its schema's anyOf).
WebhookUrl = Annotated[
    str, Field(min_length=1, max_length=URL_MAX_LENGTH), Field(json_schema_extra={"format": "uri"})
]
EventList = Annotated[
    list[EventName],
    Field(min_length=1, max_length=len(EVENT_NAMES), json_schema_extra={"uniqueItems": True}),
    AfterValidator(_distinct_events),
]
Description = Annotated[
    str | None,
    Field(max_length=DESCRIPTION_MAX_LENGTH, description="Optional note shown to people."),
    AfterValidator(normalise_description),
]
WebhookId = Annotated[
    int,
    Field(ge=1, le=MAX_ID, description="The webhook's id, as returned by create_webhook or list_webhooks."),
]
DeliveryId = Annotated[
    int,
    Field(
        ge=1, le=MAX_ID, description="A delivery id from list_deliveries whose event should be sent again."
    ),
]
Cursor = Annotated[
    str | None,
    Field(
        max_length=CURSOR_MAX_LENGTH,
        description="next_cursor from the previous page; omit for the first page.",
    ),
]
RateLimit = Annotated[
    int | None,
    Field(
        ge=RATE_LIMIT_MIN,
        le=RATE_LIMIT_MAX,
        description="At most this many deliveries per second to this webhook, 1 to 1000, across all "
        "workers (bursts of at most one second's worth); null means no limit. Deliveries over it wait "
        "in the queue.",
    ),
]
GraceSeconds = Annotated[
    int,
    Field(
        ge=0,
        le=MAX_ROTATION_GRACE,
        description="How long the old secret keeps signing beside the new one (webhook-signature), in "
        "seconds; default 86400 (24 h), 0 ends it at once.",
    ),
]
LogEvent = Literal["scan", "first_scan", "form_submit", "file_download", "test"]


class Input(BaseModel):
    """Strict and closed: unknown fields are refused and types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


# --- bodies -------------------------------------------------------------------------------------


class WebhookCreate(Input):
    url: Annotated[
        WebhookUrl,
        Field(
            description="Absolute https:// URL that will receive the POST requests. It must resolve to a "
            "public address."
        ),
    ]
    events: Annotated[
        EventList,
        Field(
            description="Events to subscribe to, each at most once: scan, first_scan (only the first scan "
            "of each QR code), form_submit, file_download."
        ),
    ]
    description: Description = None
    rate_limit: RateLimit = None


class WebhookUpdate(Input):
    """Only the fields given change (`model_fields_set`); each is checked as at creation."""

    url: Annotated[
        WebhookUrl | None, Field(description="New https:// URL (must resolve to a public address).")
    ] = None
    events: Annotated[
        EventList | None,
        Field(description="New event list, replacing the old one; each event at most once."),
    ] = None
    description: Annotated[Description, Field(description="New note; an empty string clears it.")] = None
    active: Annotated[
        bool | None,
        Field(description="false pauses the webhook: it receives nothing and its queued deliveries end."),
    ] = None
    rate_limit: RateLimit = None


class SecretRotation(Input):
    grace_seconds: GraceSeconds = DEFAULT_ROTATION_GRACE


class EventEmit(Input):
    event: EmittableEvent
    # The event's own model checks the data (events.validate_emit), with `data.<field>` errors.
    data: dict[str, Any]


class EventEmitInput(EventEmit):
    # REST takes it from the `Idempotency-Key` header (HttpRoute.headers).
    idempotency_key: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=IDEMPOTENCY_KEY_MAX,
            description="A repeat of the same request with the same key, within 24 hours, answers the "
            "first answer again and records nothing; the same key with another request is refused.",
        ),
    ] = None


class EventBatch(Input):
    # Each item is checked on its own (a bad one is refused in the answer, the rest recorded),
    # so the list holds plain objects here.
    events: Annotated[
        list[Any],
        Field(
            min_length=1,
            max_length=BATCH_MAX,
            description=f'1 to {BATCH_MAX} events, each {{"event", "data"}} as for POST /events.',
        ),
    ]


class EventBatchInput(EventBatch):
    idempotency_key: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=IDEMPOTENCY_KEY_MAX,
            description="Applies to the whole request: a repeat with the same body within 24 hours "
            "answers the first answer again and records nothing.",
        ),
    ] = None


# --- operations' whole argument lists -----------------------------------------------------------


class WebhookRef(Input):
    webhook_id: WebhookId


class WebhookPageQuery(Input):
    cursor: Cursor = None
    limit: Annotated[int, Field(ge=1, le=LIST_LIMIT_MAX, description="Webhooks per page, 1 to 100.")] = (
        LIST_LIMIT_DEFAULT
    )


class WebhookChange(WebhookUpdate):
    webhook_id: WebhookId


class SecretRotationInput(SecretRotation):
    webhook_id: WebhookId


class DeliveryLogQuery(Input):
    webhook_id: WebhookId
    state: Annotated[
        DeliveryState | None,
        Field(description="Only deliveries in this state: pending, retrying, succeeded or failed."),
    ] = None
    event: Annotated[LogEvent | None, Field(description="Only deliveries of this event.")] = None
    cursor: Cursor = None
    limit: Annotated[int, Field(ge=1, le=LIST_LIMIT_MAX, description="Deliveries per page, 1 to 100.")] = (
        LIST_LIMIT_DEFAULT
    )


class DeliveryRef(Input):
    delivery_id: DeliveryId


# Times arrive as ISO-8601 text in JSON: strict mode would refuse text for a datetime.
Moment = Annotated[AwareDatetime, Field(strict=False)]


class DeliveryRecovery(Input):
    since: Annotated[
        Moment,
        Field(description="Re-send failed deliveries created at or after this time (ISO-8601, with offset)."),
    ]
    until: Annotated[
        Moment | None, Field(description="...and before this time (ISO-8601, with offset); omit for now.")
    ] = None
    dry_run: Annotated[bool, Field(description="true counts what would be re-sent and sends nothing.")] = (
        False
    )


class DeliveryRecoveryInput(DeliveryRecovery):
    webhook_id: WebhookId


STATS_HOURS_MAX = 720


class WebhookStatsQuery(Input):
    webhook_id: WebhookId
    hours: Annotated[
        int,
        Field(
            ge=1,
            le=STATS_HOURS_MAX,
            description="How many clock hours back, the current one included: 1 to 720 (30 days); "
            "default 24.",
        ),
    ] = 24


_VALIDATORS = (AfterValidator, BeforeValidator, PlainValidator, WrapValidator)


def field_type(info: FieldInfo, *extra: Any) -> Any:
    """A model field as a standalone annotated type for the front ends that turn input-model
    fields into tool arguments or route parameters: its constraints (what their schemas show),
    plus `extra`. Its validators are left to the use case, which parses with the model itself:
    run at the front door too, they would normalise a value before the front end sees it (an
    empty description, which clears the note, would arrive as "not given")."""
    constraints = [m for m in info.metadata if not isinstance(m, _VALIDATORS)]
    return Annotated.__class_getitem__((info.annotation, *constraints, *extra))  # type: ignore[attr-defined]


# --- turning pydantic's errors into ours ---------------------------------------------------------


def _reason(error: Mapping[str, Any], bounds: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    given = error.get("input")
    if kind == "string_too_long":
        return f"is {len(given or '')} characters long; the limit is {ctx['max_length']}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        return f"must list at least {ctx['min_length']}"
    if kind == "too_long":
        return f"lists more than {ctx['max_length']}"
    if kind == "literal_error":
        return f"{given!r} is not allowed; choose from {ctx['expected']}"
    if kind in ("greater_than_equal", "less_than_equal"):
        low, high = bounds.get("ge"), bounds.get("le")
        if low is not None and high is not None:
            return f"must be from {low} to {high}, got {given}"
        bound = "at least" if kind == "greater_than_equal" else "at most"
        return f"must be {bound} {ctx.get('ge', ctx.get('le'))}, got {given}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return {
        "missing": "is required",
        "extra_forbidden": "is not a field of this request",
        "int_type": "must be an integer",
        "string_type": "must be a string",
        "bool_type": "must be true or false",
        "list_type": "must be a list",
        "dict_type": "must be an object",
    }.get(kind, str(error["msg"]))


def invalid_input(exc: ValidationError, model: type[BaseModel] | None = None) -> InvalidInput:
    """The first error, as `InvalidInput` naming the field (and both ends of its range)."""
    first = exc.errors()[0]
    # Input models are flat: the first place names the field. What follows is a list position or
    # a union member's type name ("str", "list[...]"), which no caller would recognise.
    field = str(first["loc"][0]) if first["loc"] else "body"
    bounds: dict[str, Any] = {}
    info = model.model_fields.get(field) if model is not None else None
    for rule in info.metadata if info is not None else ():
        for name in ("ge", "le"):
            if getattr(rule, name, None) is not None:
                bounds[name] = getattr(rule, name)
    return InvalidInput(field, _reason(first, bounds))


def parse(model: type[M], values: Mapping[str, Any]) -> M:
    """Validate `values` with `model`.

    Raises:
        InvalidInput: naming the first offending field.
    """
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        raise invalid_input(exc, model) from None

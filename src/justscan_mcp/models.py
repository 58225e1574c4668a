"""Data shapes: SQLModel tables and the public models every front end returns.

Families follow the full-stack-fastapi-template convention: a table class holds everything stored;
`*Public` models are what callers see (never a key hash; a webhook secret only in `WebhookCreated`).
All datetimes are timezone-aware UTC, on SQLite as on PostgreSQL.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict
from pydantic import Field as PublicField
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

EventName = Literal["scan", "first_scan", "form_submit", "file_download"]
EVENT_NAMES: tuple[str, ...] = get_args(EventName)
Scope = Literal["webhooks:read", "webhooks:write", "events:write"]
SCOPES: tuple[str, ...] = get_args(Scope)
DEFAULT_KEY_SCOPES: tuple[str, ...] = ("webhooks:read", "webhooks:write")

URL_MAX_LENGTH = 2048
DESCRIPTION_MAX_LENGTH = 500
LIST_LIMIT_MAX = 100
LIST_LIMIT_DEFAULT = 20
IDEMPOTENCY_KEY_MAX = 255


# 64-bit ids everywhere; on SQLite only a column typed exactly INTEGER is the auto-assigned rowid.
IdType = BigInteger().with_variant(Integer(), "sqlite")
MAX_ID = 2**63 - 1


class UTCDateTime(TypeDecorator[datetime]):
    """Store UTC, return aware UTC datetimes on every backend (SQLite drops the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_text(value: str | None) -> str | None:
    """Text as both databases can store it: NUL (PostgreSQL refuses it in text) and anything that
    is not a Unicode scalar value (lone surrogates, which UTF-8 cannot encode) become U+FFFD.
    Receivers' bytes are decoded with ``errors="replace"`` before they get here."""
    if value is None:
        return None
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = _SURROGATE.sub("\ufffd", value)
    return value


def utcnow() -> datetime:
    """The one clock read of the IO layers; pure code takes `now` as an argument instead."""
    return datetime.now(UTC)


# --- tables -----------------------------------------------------------------------------------


class Team(SQLModel, table=True):
    __tablename__ = "teams"
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, sa_column=Column(IdType, primary_key=True))
    name: str = Field(sa_column=Column(String(200), nullable=False, unique=True))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, sa_column=Column(IdType, primary_key=True))
    team_id: int = Field(
        sa_column=Column(IdType, ForeignKey("teams.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    name: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    # The visible start of the key ("jsi_AbCd1234"), to tell keys apart; the rest exists only as a hash.
    prefix: str = Field(sa_column=Column(String(32), nullable=False))
    key_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    scopes: list[str] = Field(sa_column=Column(JSON, nullable=False))
    mcp_enabled: bool = Field(default=True)
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    last_used_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))


class OAuthClient(SQLModel, table=True):
    """An OAuth client: registered (RFC 7591) or a fetched client ID metadata document. Its
    secret, when it has one, exists only as a hash."""

    __tablename__ = "oauth_clients"

    client_id: str = Field(sa_column=Column(String(255), primary_key=True))
    secret_hash: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    document: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class OAuthGrant(SQLModel, table=True):
    """What a person approved on the consent page: a client acting for a team, through one API
    key, with some of that key's scopes. Revoking the grant, or the key, ends its tokens."""

    __tablename__ = "oauth_grants"
    __table_args__ = (Index("ix_oauth_grants_team_id_id", "team_id", "id"), {"sqlite_autoincrement": True})

    id: int | None = Field(default=None, sa_column=Column(IdType, primary_key=True))
    client_id: str = Field(
        sa_column=Column(
            String(255), ForeignKey("oauth_clients.client_id", ondelete="CASCADE"), nullable=False
        )
    )
    team_id: int = Field(sa_column=Column(IdType, ForeignKey("teams.id", ondelete="CASCADE"), nullable=False))
    key_id: int = Field(
        sa_column=Column(IdType, ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    scopes: list[str] = Field(sa_column=Column(JSON, nullable=False))
    resource: str = Field(sa_column=Column(String(2048), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    last_used_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))


class OAuthRequest(SQLModel, table=True):
    """An authorization request waiting for the person's consent (minutes), by a hash of its
    handle."""

    __tablename__ = "oauth_requests"

    handle_hash: str = Field(sa_column=Column(String(64), primary_key=True))
    client_id: str = Field(
        sa_column=Column(
            String(255), ForeignKey("oauth_clients.client_id", ondelete="CASCADE"), nullable=False
        )
    )
    request: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class OAuthCode(SQLModel, table=True):
    """An authorization code (by hash): single use; a second use revokes its grant."""

    __tablename__ = "oauth_codes"

    code_hash: str = Field(sa_column=Column(String(64), primary_key=True))
    grant_id: int = Field(
        sa_column=Column(
            IdType, ForeignKey("oauth_grants.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    code_challenge: str = Field(sa_column=Column(String(128), nullable=False))
    redirect_uri: str = Field(sa_column=Column(String(2048), nullable=False))
    redirect_uri_explicit: bool = Field(sa_column=Column(Boolean, nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    used_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))


class OAuthToken(SQLModel, table=True):
    """An access or refresh token (by hash). A refresh token is used once: `used_at` marks it
    rotated, and presenting it again revokes the whole grant."""

    __tablename__ = "oauth_tokens"

    token_hash: str = Field(sa_column=Column(String(64), primary_key=True))
    grant_id: int = Field(
        sa_column=Column(
            IdType, ForeignKey("oauth_grants.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    kind: str = Field(sa_column=Column(String(8), nullable=False))  # "access" or "refresh"
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    used_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))


class ToolConfirmation(SQLModel, table=True):
    """The audit log of confirmations: who was asked to confirm which destructive tool call, on
    what, and what they answered (accept, decline or cancel)."""

    __tablename__ = "tool_confirmations"
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, sa_column=Column(IdType, primary_key=True))
    team_id: int = Field(sa_column=Column(IdType, ForeignKey("teams.id", ondelete="CASCADE"), nullable=False))
    key_id: int = Field(sa_column=Column(IdType, nullable=False))
    tool: str = Field(sa_column=Column(String(64), nullable=False))
    webhook_id: int | None = Field(default=None, sa_column=Column(IdType, nullable=True))
    question: str = Field(sa_column=Column(String(1000), nullable=False))
    answer: str = Field(sa_column=Column(String(16), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class DispatcherBeat(SQLModel, table=True):
    """A running dispatcher's heartbeat: written every poll interval while its claim loop turns,
    deleted when it stops. Rows whose beat is older than three of their intervals are dead."""

    __tablename__ = "dispatcher_beats"

    worker_id: str = Field(sa_column=Column(String(64), primary_key=True))
    host: str = Field(sa_column=Column(String(255), nullable=False))
    pid: int = Field(sa_column=Column(Integer, nullable=False))
    started_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    last_beat_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    interval_seconds: float = Field(sa_column=Column(Float, nullable=False))
    in_flight: int = Field(sa_column=Column(Integer, nullable=False))


class Webhook(SQLModel, table=True):
    __tablename__ = "webhooks"
    # Keyset pagination walks (team_id, id); AUTOINCREMENT keeps ids of deleted rows from coming back.
    __table_args__ = (Index("ix_webhooks_team_id_id", "team_id", "id"), {"sqlite_autoincrement": True})

    id: int | None = Field(default=None, sa_column=Column(IdType, primary_key=True))
    team_id: int = Field(sa_column=Column(IdType, ForeignKey("teams.id", ondelete="CASCADE"), nullable=False))
    url: str = Field(sa_column=Column(String(URL_MAX_LENGTH), nullable=False))
    events: list[str] = Field(sa_column=Column(JSON, nullable=False))
    description: str | None = Field(
        default=None, sa_column=Column(String(DESCRIPTION_MAX_LENGTH), nullable=True)
    )
    secret: str = Field(sa_column=Column(String(100), nullable=False))
    # After rotate_secret the old secret keeps signing `webhook-signature` until this time.
    previous_secret: str | None = Field(default=None, sa_column=Column(String(100), nullable=True))
    previous_secret_expires_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime(), nullable=True)
    )
    active: bool = Field(default=True)
    # "failing" when the service switched it off after a long failure streak (None otherwise).
    disabled_reason: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))
    # When the current failure streak began (the first delivery to fail since the last success).
    failing_since: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    # Deliveries per second (None: unlimited), and the bucket every process shares (ratelimit.py):
    # its theoretical arrival time and when claims may take from this webhook again.
    rate_limit: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    rate_tat: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    rate_open_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class Event(SQLModel, table=True):
    """A recorded event. `payload` is the exact envelope that is signed and sent, stored once."""

    __tablename__ = "events"
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, sa_column=Column(IdType, primary_key=True))
    team_id: int = Field(sa_column=Column(IdType, ForeignKey("teams.id", ondelete="CASCADE"), nullable=False))
    name: str = Field(sa_column=Column(String(32), nullable=False))
    payload: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class FirstScan(SQLModel, table=True):
    """One row per (team, QR code): its primary key is what makes first_scan happen exactly once."""

    __tablename__ = "first_scans"
    # Retention keeps the events these rows point at; it looks them up by event.
    __table_args__ = (Index("ix_first_scans_event_id", "event_id"),)

    team_id: int = Field(
        sa_column=Column(IdType, ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    )
    qr_code_id: int = Field(sa_column=Column(BigInteger, primary_key=True))
    event_id: int = Field(
        sa_column=Column(IdType, ForeignKey("events.id", ondelete="CASCADE"), nullable=False)
    )


# The states the claim looks at; the partial index's predicate must be this exact expression so
# both databases can prove the claim's WHERE implies it.
OPEN_STATES = ("pending", "retrying")
OPEN_STATES_SQL = "state IN ('pending', 'retrying')"
# The operator's failing list: failed or retrying, newest first. Written out for the same reason.
FAILING_STATES_SQL = "state IN ('failed', 'retrying')"
# The partial indexes below name only `sqlite_where`: a `postgresql_*` argument in a declaration
# imports SQLAlchemy's whole PostgreSQL dialect, every driver module with it (20-40 ms), into
# each process that imports the models, the SQLite stdio start and every CLI command included.
# The store gives them their PostgreSQL predicate when it opens PostgreSQL
# (`declare_postgresql_predicates`); the migrations create both.


class Delivery(SQLModel, table=True):
    """One event to one webhook. Claimed by a dispatcher with a lease while an attempt runs."""

    __tablename__ = "deliveries"
    __table_args__ = (
        # The claim walks due work in (next_attempt_at, id) order and stops after its LIMIT. The
        # index is partial so it holds only open deliveries and needs no sort: an index on
        # (state, next_attempt_at) made every claim sort the whole backlog (4 ms per claim at
        # 10,000 queued on SQLite, growing with the queue). The log walks one webhook's
        # deliveries newest first.
        Index(
            "ix_deliveries_open",
            "next_attempt_at",
            "id",
            sqlite_where=text(OPEN_STATES_SQL),
        ),
        Index("ix_deliveries_webhook_id_id", "webhook_id", "id"),
        # A webhook's statistics count its deliveries since a time, by state and hour.
        Index("ix_deliveries_webhook_created", "webhook_id", "created_at", "state"),
        # Retention asks "has this event any delivery left?" for every old event.
        Index("ix_deliveries_event_id", "event_id"),
        Index(
            "ix_deliveries_failing",
            "id",
            sqlite_where=text(FAILING_STATES_SQL),
        ),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(IdType, primary_key=True))
    team_id: int = Field(sa_column=Column(IdType, nullable=False))
    webhook_id: int = Field(
        sa_column=Column(IdType, ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False)
    )
    event_id: int = Field(
        sa_column=Column(IdType, ForeignKey("events.id", ondelete="CASCADE"), nullable=False)
    )
    event: str = Field(sa_column=Column(String(32), nullable=False))
    state: str = Field(sa_column=Column(String(16), nullable=False))
    is_test: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, default=False))
    attempt_count: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0))
    next_attempt_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    lease_owner: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    lease_expires_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    redelivery_of: int | None = Field(default=None, sa_column=Column(IdType, nullable=True))
    note: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


def declare_postgresql_predicates() -> None:
    """Give every partial index its PostgreSQL predicate, the same as its SQLite one, so that
    the metadata describes a PostgreSQL database fully (`create_all`, Alembic's comparison).
    Idempotent; loads the PostgreSQL dialect, which a PostgreSQL engine has loaded already."""
    for table in SQLModel.metadata.tables.values():
        for index in table.indexes:
            where = index.dialect_options["sqlite"]["where"]
            if where is not None:
                index.dialect_options["postgresql"]["where"] = where


class DeliveryAttempt(SQLModel, table=True):
    __tablename__ = "delivery_attempts"
    __table_args__ = (
        UniqueConstraint("delivery_id", "number", name="uq_delivery_attempts_number"),
        # A webhook's statistics read its attempts since a time from this index alone.
        Index("ix_delivery_attempts_stats", "webhook_id", "started_at", "outcome", "duration_ms"),
        # The operator's "last five minutes" (status, the admin overview, /metrics) across webhooks.
        Index("ix_delivery_attempts_started", "started_at", "outcome", "webhook_id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(IdType, primary_key=True))
    delivery_id: int = Field(
        sa_column=Column(IdType, ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False)
    )
    # The delivery's webhook and the attempt's outcome class, copied at write time so statistics
    # need no join (the join was most of their time: 30 ms for a day of a busy webhook).
    webhook_id: int | None = Field(default=None, sa_column=Column(IdType, nullable=True))
    outcome: str | None = Field(default=None, sa_column=Column(String(10), nullable=True))
    number: int = Field(sa_column=Column(Integer, nullable=False))
    worker: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    started_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    duration_ms: int = Field(sa_column=Column(Integer, nullable=False))
    status_code: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    response_body: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    next_retry_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    # The receiver's Retry-After (429/503), in seconds, when it was given and the delivery retries.
    retry_after_seconds: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class IdempotencyKey(SQLModel, table=True):
    """One `Idempotency-Key` of a team's `POST /events`: the request it was first used with (a
    hash) and the answer it got. The primary key is what makes a concurrent repeat wait and then
    replay, instead of recording the event twice."""

    __tablename__ = "idempotency_keys"

    team_id: int = Field(
        sa_column=Column(IdType, ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    )
    key: str = Field(sa_column=Column(String(IDEMPOTENCY_KEY_MAX), primary_key=True))
    request_hash: str = Field(sa_column=Column(String(64), nullable=False))
    response: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))


class InstanceSecret(SQLModel, table=True):
    """Secrets shared by every process on one database (e.g. the cursor signing key)."""

    __tablename__ = "instance_secrets"

    name: str = Field(sa_column=Column(String(64), primary_key=True))
    value: str = Field(sa_column=Column(String(200), nullable=False))


class DashboardSession(SQLModel, table=True):
    """A signed-in dashboard browser. The cookie holds a random token; only its SHA-256 is
    stored, so a copy of the database cannot be used to sign in. `key_id` is the API key the
    person signed in with (its scopes and revocation are re-read on every request), or None for
    the operator. Kept in the database so every server process knows every session."""

    __tablename__ = "dashboard_sessions"

    token_hash: str = Field(sa_column=Column(String(64), primary_key=True))
    key_id: int | None = Field(
        default=None,
        sa_column=Column(IdType, ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=True),
    )
    csrf_token: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    # Operator sessions: a fingerprint of the admin password they were opened with (see
    # Service.dashboard_session); a changed or unset password ends them.
    operator_fingerprint: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))


# --- public shapes ----------------------------------------------------------------------------


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class TeamPublic(_Public):
    id: int
    name: str


class ApiKeyPublic(_Public):
    id: int
    team_id: int
    name: str | None
    prefix: str
    scopes: list[str]
    mcp_enabled: bool
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class ApiKeyCreated(_Public):
    """The only shape that ever carries the plain key; it is shown once."""

    id: int
    key: str
    team_id: int
    name: str | None
    prefix: str
    scopes: list[str]
    mcp_enabled: bool


class WebhookPublic(_Public):
    id: int
    team_id: int
    url: str
    events: list[str]
    description: str | None
    active: bool
    rate_limit: int | None = None
    disabled_reason: str | None = None
    failing_since: datetime | None = None
    created_at: datetime
    updated_at: datetime


class WebhookCreated(WebhookPublic):
    """create_webhook's answer: the webhook plus its signing secret, which no other read returns."""

    secret: str


class SecretRotated(_Public):
    """rotate_secret's answer: the new secret, shown once, and until when the old one still signs."""

    webhook_id: int
    secret: str
    previous_secret_expires_at: datetime | None


class WebhookPage(BaseModel):
    webhooks: list[WebhookPublic]
    next_cursor: str | None


class AttemptPublic(_Public):
    number: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    response_body: str | None
    error: str | None
    next_retry_at: datetime | None
    retry_after_seconds: int | None = None


class DeliveryPublic(_Public):
    id: int
    webhook_id: int
    event_id: int
    event: str
    state: str
    is_test: bool
    redelivery_of: int | None = None
    note: str | None = None
    created_at: datetime
    next_attempt_at: datetime | None
    attempts: list[AttemptPublic]


class DeliveryPage(BaseModel):
    deliveries: list[DeliveryPublic]
    next_cursor: str | None


class WebhookSummary(WebhookPublic):
    """A webhook with its newest delivery (the dashboard's list)."""

    last_delivery: DeliveryPublic | None


class FailingDelivery(DeliveryPublic):
    """A failed or retrying delivery in the operator's cross-team view."""

    team_id: int
    url: str


class AdminOverview(BaseModel):
    """One page of the operator's view. `teams` are the teams named on the page; the two lists
    page on their own (`next_webhooks`: pass as `webhooks_after`; `next_failing`: as
    `failing_before`)."""

    teams: list[TeamPublic]
    # Each listed team's succeeded / finished over its deliveries of the last 24 hours (None: none).
    success_rates: dict[int, float | None] = {}
    switched_off: list[WebhookPublic] = []  # auto-disabled webhooks, listed first
    webhooks: list[WebhookSummary]
    failing: list[FailingDelivery]
    next_webhooks: int | None = None
    next_failing: int | None = None


class AdminKeys(BaseModel):
    """One page of teams with their API keys; `next_teams`: pass as `teams_after`."""

    teams: list[TeamPublic]
    keys: dict[int, list[ApiKeyPublic]]
    next_teams: int | None = None


class RecoveryResult(BaseModel):
    """recover_deliveries' answer: the new deliveries (for a dry run, the failed ones that would be
    re-sent), and whether more remain past this call's limit (call again to continue)."""

    count: int
    deliveries: list[int]
    more: bool
    dry_run: bool


ATTEMPT_CLASSES = ("2xx", "3xx", "4xx", "5xx", "timeout", "connection")
# The sender's error text for an attempt that got no answer within the delivery timeout.
TIMEOUT_ERROR_PREFIX = "timed out"


def outcome_class(status_code: int | None, error: str | None) -> str:
    """An attempt's outcome class (ATTEMPT_CLASSES): the status's class, or without a status a
    timeout or, for anything else (refused, reset, DNS), a connection failure."""
    if status_code is not None:
        return (
            "5xx"
            if status_code >= 500
            else "4xx"
            if status_code >= 400
            else "3xx"
            if status_code >= 300
            else "2xx"
        )
    return "timeout" if (error or "").startswith(TIMEOUT_ERROR_PREFIX) else "connection"


# What /metrics and the attempt log lines call an attempt: the stored classes, with the attempts
# our own address rules stopped before any connection ("refused: ...") told apart from
# connection failures (stored and counted by get_webhook_stats as "connection", as SPEC pins).
REFUSED_ERROR_PREFIX = "refused:"
METRIC_OUTCOMES = (*ATTEMPT_CLASSES, "refused")


def metric_outcome(status_code: int | None, error: str | None) -> str:
    """`outcome_class`, with "refused" for a target the address rules refused."""
    if status_code is None and (error or "").startswith(REFUSED_ERROR_PREFIX):
        return "refused"
    return outcome_class(status_code, error)


class LatencyPercentiles(BaseModel):
    """Attempt durations in milliseconds (nearest rank); null when there was no attempt."""

    p50: int | None
    p95: int | None


class HourlyOutcome(BaseModel):
    hour: datetime  # the start of the UTC clock hour
    succeeded: int
    failed: int
    latency_ms: int | None = PublicField(
        default=None, description="Mean attempt duration of that hour's deliveries (null: none)."
    )


class WebhookStats(BaseModel):
    """get_webhook_stats' answer, over the deliveries created in the last `hours` clock hours (the
    current one included) and their attempts."""

    webhook_id: int
    hours: int
    since: datetime
    deliveries: dict[str, int] = PublicField(
        description="Deliveries by state: pending, retrying, succeeded, failed."
    )
    attempts: dict[str, int] = PublicField(
        description="Attempts by outcome: 2xx, 3xx, 4xx, 5xx (the receiver's status class), timeout "
        "(no answer within the delivery timeout), connection (no HTTP answer: refused, reset, DNS)."
    )
    success_rate: float | None = PublicField(
        description="succeeded / (succeeded + failed), 0 to 1; null when no delivery has finished."
    )
    latency_ms: LatencyPercentiles
    failing_since: datetime | None = PublicField(
        description="When the current failure streak began (null: the last finished delivery succeeded)."
    )
    hourly: list[HourlyOutcome] = PublicField(
        description="Succeeded and failed deliveries per clock hour, oldest first, one entry per hour."
    )


class EmitResult(BaseModel):
    event_id: int
    deliveries: list[int]
    # True when this is a stored answer to a repeated Idempotency-Key (sent as a header, never in
    # the body, so a replay's body is the first answer's exactly).
    replayed: bool = PublicField(default=False, exclude=True)


BATCH_MAX = 1000  # events per POST /events/batch


class BatchItemResult(BaseModel):
    """One event of a batch: recorded (`event_id`, `deliveries`), or refused (`error`, `message`,
    `field` naming it as `events[i].<field>`; nothing of it was recorded)."""

    index: int
    event_id: int | None = None
    deliveries: list[int] | None = None
    error: str | None = None
    message: str | None = None
    field: str | None = None


class BatchEmitResult(BaseModel):
    """The answer to a batch: per event, in order, its id and deliveries or its error."""

    recorded: int
    failed: int
    results: list[BatchItemResult]
    replayed: bool = PublicField(default=False, exclude=True)


class TestOutcome(BaseModel):
    delivery_id: int
    state: str
    status_code: int | None
    duration_ms: int | None
    response_body: str | None
    error: str | None


class Principal(BaseModel):
    """Who is calling: an API key resolved against the database at the time of the call."""

    key_id: int
    team_id: int
    scopes: frozenset[str]
    mcp_enabled: bool
    label: str = ""  # the key's name, or its visible prefix, for people to read

    def has(self, scope: str) -> bool:
        return scope in self.scopes


class Operator(BaseModel):
    """The operator acting for one team (the CLI): every scope, and no API key behind it."""

    team_id: int

    def has(self, scope: str) -> bool:
        return True


Caller = Principal | Operator
"""Whom a use case acts for; both name a team and answer `has(scope)`."""


class UncheckedKey(BaseModel):
    """An API key that exists, before its state (revoked, MCP switch, scopes) is checked: what
    the HTTP layer knows of an SSE message's key, until the MCP gate reads it."""

    key_id: int


class WebhookDeleted(BaseModel):
    deleted: bool = PublicField(description="Always true: the webhook no longer exists.")
    webhook_id: int


class DispatcherPublic(BaseModel):
    """A live dispatcher as the operator's views show it."""

    model_config = ConfigDict(from_attributes=True)

    worker_id: str
    host: str
    pid: int
    started_at: datetime
    last_beat_at: datetime
    in_flight: int


class FailingWebhook(BaseModel):
    """A webhook among those with most failed attempts in the status window."""

    webhook_id: int
    team_id: int
    failed_attempts: int
    failing_since: datetime | None


class OperationsStatus(BaseModel):
    """What an operator looks at first (`justscan-mcp status`, the admin area, /metrics): the
    live dispatchers, the open backlog and its oldest due delivery, and the last
    `window_seconds` of attempts across every team."""

    generated_at: datetime
    window_seconds: int
    dispatchers: list[DispatcherPublic]
    open_deliveries: dict[str, int]  # pending, retrying
    oldest_due_at: datetime | None
    oldest_due_age_seconds: float | None
    attempts: dict[str, int]  # by stored outcome class (ATTEMPT_CLASSES), in the window
    success_rate: float | None  # 2xx / all attempts in the window; None without attempts
    top_failing: list[FailingWebhook]
    switched_off: int  # webhooks auto-disabled for failing

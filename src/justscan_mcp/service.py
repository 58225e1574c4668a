"""Use cases of justscan-mcp. Every rule of SPEC lives here once, for every front end.

Front ends (MCP, REST, CLI, dashboard) unpack arguments, call these methods and map
`justscan_mcp.errors` to their own vocabulary. Nothing here knows a transport. Methods are
synchronous and keyword-only; async callers run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from justscan_mcp.config import Settings
from justscan_mcp.errors import InvalidInput, McpDisabled, MissingScope, NotFound, Unauthenticated
from justscan_mcp.events import TestData, envelope, validate_emit
from justscan_mcp.models import (
    DEFAULT_KEY_SCOPES,
    DESCRIPTION_MAX_LENGTH,
    EVENT_NAMES,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    MAX_ID,
    OPEN_STATES,
    SCOPES,
    AdminOverview,
    ApiKey,
    ApiKeyCreated,
    ApiKeyPublic,
    AttemptPublic,
    DashboardSession,
    Delivery,
    DeliveryAttempt,
    DeliveryPage,
    DeliveryPublic,
    EmitResult,
    FailingDelivery,
    Principal,
    SecretRotated,
    TeamPublic,
    TestOutcome,
    Webhook,
    WebhookCreated,
    WebhookPage,
    WebhookPublic,
    WebhookSummary,
    utcnow,
)
from justscan_mcp.retry import DELIVERY_STATES
from justscan_mcp.security import (
    CursorCodec,
    api_key_prefix,
    generate_api_key,
    generate_webhook_secret,
    hash_api_key,
    looks_like_api_key,
)
from justscan_mcp.store import LAST_USED_RESOLUTION, Store
from justscan_mcp.targets import Resolver, system_resolver, validate_webhook_url

UPDATABLE = frozenset({"url", "events", "description", "active"})
DEFAULT_ROTATION_GRACE = 24 * 3600
MAX_ROTATION_GRACE = 7 * 24 * 3600
DASHBOARD_SESSION_TTL = timedelta(hours=12)
READ = "webhooks:read"
WRITE = "webhooks:write"
TEAM_NAME_MAX = 200


def _positive_id(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, f"must be an integer id, got {value!r}")
    if not 1 <= value <= MAX_ID:
        raise InvalidInput(field, f"must be a positive integer id, got {value}")
    return value


def validate_events(events: Any) -> list[str]:
    """Raises: InvalidInput (field ``events``) unless a non-empty list of distinct known events."""
    choices = ", ".join(EVENT_NAMES)
    if not isinstance(events, list | tuple) or not events:
        raise InvalidInput("events", f"must list at least one event; choose from {choices}")
    seen: list[str] = []
    for name in events:
        if not isinstance(name, str) or name not in EVENT_NAMES:
            raise InvalidInput("events", f"{name!r} is not an event; choose from {choices}")
        if name in seen:
            raise InvalidInput("events", f"{name!r} is listed twice; list each event once")
        seen.append(name)
    return seen


def validate_description(description: Any) -> str | None:
    """Raises: InvalidInput (field ``description``) for a non-string or one over 500 characters."""
    if description is None:
        return None
    if not isinstance(description, str):
        raise InvalidInput("description", "must be a string")
    if len(description) > DESCRIPTION_MAX_LENGTH:
        raise InvalidInput(
            "description", f"is {len(description)} characters long; the limit is {DESCRIPTION_MAX_LENGTH}"
        )
    return description


def validate_limit(limit: Any) -> int:
    """Raises: InvalidInput (field ``limit``) outside 1..100 (not clamped)."""
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidInput("limit", f"must be an integer from 1 to {LIST_LIMIT_MAX}")
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise InvalidInput("limit", f"must be from 1 to {LIST_LIMIT_MAX}, got {limit}")
    return limit


def validate_scopes(scopes: Iterable[Any]) -> list[str]:
    """Raises: InvalidInput (field ``scopes``) for an empty list, an unknown scope or a duplicate."""
    out: list[str] = []
    for scope in scopes:
        if scope not in SCOPES:
            raise InvalidInput("scopes", f"{scope!r} is not a scope; choose from {', '.join(SCOPES)}")
        if scope in out:
            raise InvalidInput("scopes", f"{scope!r} is listed twice")
        out.append(scope)
    if not out:
        raise InvalidInput("scopes", f"must list at least one scope from {', '.join(SCOPES)}")
    return out


def _principal(key: ApiKey) -> Principal:
    assert key.id is not None
    return Principal(
        key_id=key.id, team_id=key.team_id, scopes=frozenset(key.scopes), mcp_enabled=key.mcp_enabled
    )


class Service:
    """The use cases, over one `Store`."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        resolver: Resolver = system_resolver,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.settings = settings
        self.resolver = resolver
        self.clock = clock
        self._cursors: CursorCodec | None = None
        self._operator_fp: str | None = None
        # Set by the app to the local dispatcher's wake(): a recorded event is sent at once.
        self.on_recorded: Callable[[], None] = lambda: None

    @property
    def cursors(self) -> CursorCodec:
        if self._cursors is None:
            self._cursors = CursorCodec(self.store.instance_secret("cursor_key").encode())
        return self._cursors

    # --- teams ------------------------------------------------------------------------------

    def create_team(self, *, name: str) -> TeamPublic:
        """Raises: InvalidInput for an empty or overlong name; Conflict when it is taken."""
        name = (name or "").strip()
        if not name:
            raise InvalidInput("name", "must not be empty")
        if len(name) > TEAM_NAME_MAX:
            raise InvalidInput("name", f"is {len(name)} characters long; the limit is {TEAM_NAME_MAX}")
        return TeamPublic.model_validate(self.store.create_team(name=name, now=self.clock()))

    def list_teams(self) -> list[TeamPublic]:
        return [TeamPublic.model_validate(t) for t in self.store.list_teams()]

    def _require_team(self, team_id: Any) -> int:
        tid = _positive_id("team", team_id)
        if self.store.get_team(tid) is None:
            raise NotFound("team", f"team {tid} does not exist; create it with `justscan-mcp team create`")
        return tid

    # --- API keys ---------------------------------------------------------------------------

    def create_api_key(
        self,
        *,
        team_id: int,
        scopes: Sequence[str] = DEFAULT_KEY_SCOPES,
        mcp_enabled: bool = True,
        name: str | None = None,
    ) -> ApiKeyCreated:
        """Create a key; its plain text is in the result and nowhere else.

        Raises:
            InvalidInput: for bad scopes or name. NotFound: for an unknown team.
        """
        scope_list = validate_scopes(scopes)
        if name is not None and len(name) > TEAM_NAME_MAX:
            raise InvalidInput("name", f"is {len(name)} characters long; the limit is {TEAM_NAME_MAX}")
        team_id = self._require_team(team_id)
        raw = generate_api_key()
        key = self.store.add_api_key(
            ApiKey(
                team_id=team_id,
                name=name,
                prefix=api_key_prefix(raw),
                key_hash=hash_api_key(raw),
                scopes=scope_list,
                mcp_enabled=mcp_enabled,
                created_at=self.clock(),
            )
        )
        return ApiKeyCreated.model_validate({**key.model_dump(), "key": raw})

    def list_api_keys(self, *, team_id: int) -> list[ApiKeyPublic]:
        """Raises: NotFound for an unknown team."""
        team_id = self._require_team(team_id)
        return [ApiKeyPublic.model_validate(k) for k in self.store.list_api_keys(team_id)]

    def update_api_key(
        self, *, key_id: int, mcp_enabled: bool | None = None, scopes: Sequence[str] | None = None
    ) -> ApiKeyPublic:
        """Change a key's MCP switch and/or scopes; takes effect on the key's next call.

        Raises:
            InvalidInput: for bad scopes or nothing to change. NotFound: for an unknown key.
        """
        key_id = _positive_id("key", key_id)
        values: dict[str, Any] = {}
        if mcp_enabled is not None:
            values["mcp_enabled"] = bool(mcp_enabled)
        if scopes is not None:
            values["scopes"] = validate_scopes(scopes)
        if not values:
            raise InvalidInput("key", "nothing to change: give --mcp/--no-mcp or --scopes")
        key = self.store.update_api_key(key_id, **values)
        if key is None:
            raise NotFound("key", f"API key {key_id} does not exist")
        return ApiKeyPublic.model_validate(key)

    def revoke_api_key(self, *, key_id: int) -> ApiKeyPublic:
        """Revoke a key; it stops working on its next call. Revoking twice keeps the first time.

        Raises:
            NotFound: for an unknown key.
        """
        key_id = _positive_id("key", key_id)
        existing = self.store.get_api_key(key_id)
        if existing is None:
            raise NotFound("key", f"API key {key_id} does not exist")
        if existing.revoked_at is not None:
            return ApiKeyPublic.model_validate(existing)
        key = self.store.update_api_key(key_id, revoked_at=self.clock())
        assert key is not None
        return ApiKeyPublic.model_validate(key)

    # --- authentication ---------------------------------------------------------------------

    def authenticate(self, raw_key: str | None) -> Principal:
        """Resolve a presented API key to its current principal.

        Raises:
            Unauthenticated: no key, an unknown key or a revoked key.
        """
        if not raw_key:
            raise Unauthenticated("no API key given; send Authorization: Bearer jsi_...")
        if not looks_like_api_key(raw_key):
            raise Unauthenticated("that is not a justscan API key (they start with jsi_)")
        key = self.store.get_api_key_by_hash(hash_api_key(raw_key))
        return self._live(key)

    def identify_key(self, raw_key: str | None) -> int:
        """The id of a presented key whatever its state (revoked, MCP off); for callers that
        report the state themselves.

        Raises:
            Unauthenticated: no key or an unknown key.
        """
        if not raw_key or not looks_like_api_key(raw_key):
            raise Unauthenticated("no API key given; send Authorization: Bearer jsi_...")
        key = self.store.get_api_key_by_hash(hash_api_key(raw_key))
        if key is None or key.id is None:
            raise Unauthenticated("unknown API key")
        return key.id

    def principal_for_key_id(self, key_id: int) -> Principal:
        """The key's state now (revocation, MCP switch and scopes are re-read on every call).

        Raises:
            Unauthenticated: the key is gone or revoked.
        """
        return self._live(self.store.get_api_key(key_id))

    def _live(self, key: ApiKey | None) -> Principal:
        if key is None:
            raise Unauthenticated("unknown API key")
        if key.revoked_at is not None:
            raise Unauthenticated(f"API key {key.prefix}... was revoked")
        assert key.id is not None
        now = self.clock()
        # last_used_at is informative (one-minute resolution): skip the write while it is fresh,
        # so an authenticated read stays a read.
        if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
            self.store.touch_api_key(key.id, now=now)
        return _principal(key)

    def operator(self, *, team_id: Any) -> Principal:
        """A principal with every scope for one team: the CLI acts as the operator, not as a key.

        Raises:
            InvalidInput, NotFound: (team) for a malformed or unknown team id.
        """
        return Principal(
            key_id=0, team_id=self._require_team(team_id), scopes=frozenset(SCOPES), mcp_enabled=False
        )

    @staticmethod
    def require_mcp(principal: Principal) -> None:
        """Raises: McpDisabled when the key's MCP switch is off."""
        if not principal.mcp_enabled:
            raise McpDisabled(
                f"MCP is not enabled for API key {principal.key_id}; turn it on on the API key page "
                f"or with `justscan-mcp key update {principal.key_id} --mcp`"
            )

    @staticmethod
    def require_scope(principal: Principal, scope: str, operation: str) -> None:
        """Raises: MissingScope naming the scope."""
        if not principal.has(scope):
            raise MissingScope(scope, operation)

    # --- webhooks ---------------------------------------------------------------------------

    def create_webhook(
        self, *, principal: Principal, url: str, events: Sequence[str], description: str | None = None
    ) -> WebhookCreated:
        """Create a webhook for the caller's team; the result is the only place its secret is shown.

        Raises:
            MissingScope, InvalidInput (url, events, description).
        """
        self.require_scope(principal, WRITE, "create_webhook")
        event_list = validate_events(events)
        description = validate_description(description)
        url = validate_webhook_url(
            url, allow_private=self.settings.allow_private_targets, resolve=self.resolver
        )
        now = self.clock()
        webhook = self.store.add_webhook(
            Webhook(
                team_id=principal.team_id,
                url=url,
                events=event_list,
                description=description,
                secret=generate_webhook_secret(),
                active=True,
                created_at=now,
                updated_at=now,
            )
        )
        return WebhookCreated.model_validate(webhook)

    def get_webhook(self, *, principal: Principal, webhook_id: int) -> WebhookPublic:
        """Raises: MissingScope, InvalidInput, NotFound (also for another team's id)."""
        self.require_scope(principal, READ, "get_webhook")
        return WebhookPublic.model_validate(self._own_webhook(principal, webhook_id))

    def list_webhooks(
        self, *, principal: Principal, cursor: str | None = None, limit: int = LIST_LIMIT_DEFAULT
    ) -> WebhookPage:
        """One page of the team's webhooks, oldest first; pass `next_cursor` back for the next.

        Raises:
            MissingScope, InvalidInput (limit, cursor).
        """
        self.require_scope(principal, READ, "list_webhooks")
        limit = validate_limit(limit)
        now = self.clock()
        after = 0
        if cursor is not None:
            if not isinstance(cursor, str) or not cursor:
                raise InvalidInput("cursor", "must be next_cursor from a previous page, or omitted")
            after = self.cursors.decode(cursor, kind="webhooks", team_id=principal.team_id, now=now)
        rows = self.store.list_webhooks(team_id=principal.team_id, after_id=after, limit=limit + 1)
        page = list(rows[:limit])
        next_cursor = None
        if len(rows) > limit:
            last = page[-1].id
            assert last is not None
            next_cursor = self.cursors.encode(
                kind="webhooks", team_id=principal.team_id, after_id=last, now=now
            )
        return WebhookPage(webhooks=[WebhookPublic.model_validate(w) for w in page], next_cursor=next_cursor)

    def update_webhook(
        self, *, principal: Principal, webhook_id: int, changes: Mapping[str, Any]
    ) -> WebhookPublic:
        """Change the fields given (url, events, description, active), each checked as strictly as
        at creation. Deactivating also ends the webhook's queued deliveries.

        Raises:
            MissingScope, InvalidInput (the field, or ``body`` when nothing or an unknown field is
            given), NotFound.
        """
        self.require_scope(principal, WRITE, "update_webhook")
        wid = _positive_id("webhook_id", webhook_id)
        if not changes:
            raise InvalidInput("body", "give at least one of url, events, description, active")
        unknown = sorted(set(changes) - UPDATABLE)
        if unknown:
            raise InvalidInput(
                unknown[0], f"is not a field that can be changed; use {', '.join(sorted(UPDATABLE))}"
            )
        values: dict[str, Any] = {}
        if "events" in changes:
            values["events"] = validate_events(changes["events"])
        if "description" in changes:
            values["description"] = validate_description(changes["description"])
        if "active" in changes:
            if not isinstance(changes["active"], bool):
                raise InvalidInput("active", "must be true or false")
            values["active"] = changes["active"]
        if "url" in changes:
            values["url"] = validate_webhook_url(
                changes["url"], allow_private=self.settings.allow_private_targets, resolve=self.resolver
            )
        webhook = self.store.update_webhook(
            team_id=principal.team_id, webhook_id=wid, now=self.clock(), **values
        )
        if webhook is None:
            raise self._not_found(wid)
        return WebhookPublic.model_validate(webhook)

    def rotate_secret(
        self, *, principal: Principal, webhook_id: int, grace_seconds: int = DEFAULT_ROTATION_GRACE
    ) -> SecretRotated:
        """Give the webhook a new secret. X-Webhook-Signature uses the new one at once; the old one
        keeps signing `webhook-signature` beside it for `grace_seconds` (0 ends it now).

        Raises:
            MissingScope, InvalidInput (webhook_id, grace_seconds), NotFound.
        """
        self.require_scope(principal, WRITE, "rotate_secret")
        if (
            isinstance(grace_seconds, bool)
            or not isinstance(grace_seconds, int)
            or not 0 <= grace_seconds <= MAX_ROTATION_GRACE
        ):
            raise InvalidInput("grace_seconds", f"must be an integer from 0 to {MAX_ROTATION_GRACE} (7 days)")
        wid = _positive_id("webhook_id", webhook_id)
        now = self.clock()
        new = generate_webhook_secret()
        until = now + timedelta(seconds=grace_seconds) if grace_seconds else None
        # One statement: two rotations at once each keep the secret the other made (read, then
        # write in a second transaction lost one of them).
        if not self.store.rotate_secret(
            team_id=principal.team_id, webhook_id=wid, secret=new, grace_until=until, now=now
        ):
            raise self._not_found(wid)
        return SecretRotated(webhook_id=wid, secret=new, previous_secret_expires_at=until)

    def redeliver(self, *, principal: Principal, delivery_id: int) -> DeliveryPublic:
        """Queue a new delivery of a past delivery's event to its webhook, linked to the original
        (`redelivery_of`). It is a normal delivery: signed anew, retried on the schedule.

        Raises:
            MissingScope, InvalidInput (delivery_id), NotFound, Conflict (the webhook is inactive).
        """
        self.require_scope(principal, WRITE, "redeliver")
        did = _positive_id("delivery_id", delivery_id)
        found = self.store.get_delivery(team_id=principal.team_id, delivery_id=did)
        if found is None:
            raise NotFound(
                "delivery_id", f"delivery {did} does not exist in this team; list_deliveries shows the ids"
            )
        # The store checks `active` in the transaction that inserts (Conflict when inactive).
        copy = self.store.redeliver(team_id=principal.team_id, delivery_id=did, now=self.clock())
        if copy is None:
            raise NotFound("delivery_id", f"delivery {did} does not exist in this team")
        self.on_recorded()
        return _delivery_public(copy, [])

    def delete_webhook(self, *, principal: Principal, webhook_id: int) -> None:
        """Raises: MissingScope, InvalidInput, NotFound (also for another team's id)."""
        self.require_scope(principal, WRITE, "delete_webhook")
        webhook_id = _positive_id("webhook_id", webhook_id)
        if not self.store.delete_webhook(team_id=principal.team_id, webhook_id=webhook_id):
            raise self._not_found(webhook_id)

    def _own_webhook(self, principal: Principal, webhook_id: Any) -> Webhook:
        webhook_id = _positive_id("webhook_id", webhook_id)
        webhook = self.store.get_webhook(team_id=principal.team_id, webhook_id=webhook_id)
        if webhook is None:
            raise self._not_found(webhook_id)
        return webhook

    @staticmethod
    def _not_found(webhook_id: int) -> NotFound:
        # The same words for a missing id and another team's id: existence must not leak.
        return NotFound(
            "webhook_id",
            f"webhook {webhook_id} does not exist in this team; list_webhooks shows the valid ids",
        )

    # --- dashboard --------------------------------------------------------------------------

    def sign_in_with_key(self, raw_key: str | None) -> tuple[str, DashboardSession]:
        """A dashboard session for an API key; the key's scopes and revocation apply to it.
        Returns the session token for the cookie (shown nowhere else) and the session.

        Raises:
            Unauthenticated: no key, an unknown key or a revoked key.
        """
        principal = self.authenticate((raw_key or "").strip() or None)
        return self._new_session(principal.key_id)

    def sign_in_operator(self, password: str | None) -> tuple[str, DashboardSession]:
        """A dashboard session for the operator (JUSTSCAN_ADMIN_PASSWORD).

        Raises:
            Unauthenticated: the admin area is closed, or the password is wrong.
        """
        expected = self.settings.admin_password
        if not expected:
            raise Unauthenticated("the admin area is closed: set JUSTSCAN_ADMIN_PASSWORD to open it")
        # Digests of equal length, so the comparison's time says nothing about the length.
        given = hashlib.sha256((password or "").encode()).digest()
        if not hmac.compare_digest(given, hashlib.sha256(expected.encode()).digest()):
            raise Unauthenticated("wrong admin password")
        return self._new_session(None, operator_fingerprint=self._operator_fingerprint())

    def _operator_fingerprint(self) -> str | None:
        """A salted scrypt of the configured admin password (None when the admin area is
        closed), computed once per process: what an operator session must match to stay valid."""
        password = self.settings.admin_password
        if not password:
            return None
        if self._operator_fp is None:
            salt = self.store.instance_secret("operator_salt").encode()
            self._operator_fp = hashlib.scrypt(
                password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32
            ).hex()
        return self._operator_fp

    def _new_session(
        self, key_id: int | None, *, operator_fingerprint: str | None = None
    ) -> tuple[str, DashboardSession]:
        token = secrets.token_urlsafe(32)
        now = self.clock()
        row = DashboardSession(
            token_hash=hash_api_key(token),
            key_id=key_id,
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=now + DASHBOARD_SESSION_TTL,
            operator_fingerprint=operator_fingerprint,
        )
        self.store.add_dashboard_session(row, now=now)
        return token, row

    def dashboard_session(self, token: str | None) -> tuple[DashboardSession, Principal | None]:
        """The session behind a cookie and, for a key session, the key's principal as of now
        (None for the operator).

        Raises:
            Unauthenticated: no session, an expired one, or its key was revoked or deleted.
        """
        if not token:
            raise Unauthenticated("not signed in")
        row = self.store.get_dashboard_session(hash_api_key(token), now=self.clock())
        if row is None:
            raise Unauthenticated("your session has ended; sign in again")
        if row.key_id is None:
            fingerprint = self._operator_fingerprint()
            if fingerprint is None or not hmac.compare_digest(row.operator_fingerprint or "", fingerprint):
                self.store.delete_dashboard_session(row.token_hash)
                raise Unauthenticated("the admin password was changed or unset; sign in again")
            return row, None
        try:
            return row, self.principal_for_key_id(row.key_id)
        except Unauthenticated:
            self.store.delete_dashboard_session(row.token_hash)
            raise

    def end_dashboard_session(self, token: str | None) -> None:
        if token:
            self.store.delete_dashboard_session(hash_api_key(token))

    def webhook_summaries(
        self, *, principal: Principal, cursor: str | None = None, limit: int = LIST_LIMIT_MAX
    ) -> tuple[list[WebhookSummary], str | None]:
        """A page of the team's webhooks, each with its newest delivery.

        Raises:
            MissingScope, InvalidInput (cursor).
        """
        page = self.list_webhooks(principal=principal, cursor=cursor, limit=limit)
        last = self.store.last_deliveries([w.id for w in page.webhooks])
        return [_summary(w, last.get(w.id)) for w in page.webhooks], page.next_cursor

    def admin_overview(self, *, limit: int = 200) -> AdminOverview:
        """The operator's view across teams: teams, webhooks with their last outcome, and the
        newest failed or retrying deliveries."""
        hooks = [WebhookPublic.model_validate(w) for w in self.store.all_webhooks(limit=limit)]
        last = self.store.last_deliveries([w.id for w in hooks])
        failing = [
            FailingDelivery(
                **_delivery_public(d, [attempt] if attempt else []).model_dump(), team_id=d.team_id, url=url
            )
            for d, attempt, url in self.store.failing_deliveries(limit=limit)
        ]
        return AdminOverview(
            teams=self.list_teams(), webhooks=[_summary(w, last.get(w.id)) for w in hooks], failing=failing
        )

    # --- events -----------------------------------------------------------------------------

    def emit_event(self, *, team_id: Any, event: Any, data: Any) -> EmitResult:
        """Record an event for a team and fan it out to its subscribed, active webhooks.

        The first `scan` of a QR code in a team also produces a `first_scan`; its deliveries are
        in the result too.

        Raises:
            InvalidInput: (event, data, data.<field>) for an unknown or internal event name, data
                that is not an object, or a missing, mistyped or unknown field.
            NotFound: (team) for a team that does not exist.
        """
        model = validate_emit(event, data)
        tid = self._require_team(team_id)
        now = self.clock()
        first = None
        if event == "scan":
            first = (int(model.qr_code_id), envelope("first_scan", model, now))  # type: ignore[attr-defined]
        event_id, deliveries = self.store.record_event(
            team_id=tid, event=event, payload=envelope(event, model, now), now=now, first_scan=first
        )
        if deliveries:
            self.on_recorded()
        return EmitResult(event_id=event_id, deliveries=deliveries)

    def emit_event_as(self, *, principal: Principal, event: Any, data: Any) -> EmitResult:
        """`emit_event` for the caller's own team. Raises: MissingScope (events:write) and as emit_event."""
        self.require_scope(principal, "events:write", "emitting events")
        return self.emit_event(team_id=principal.team_id, event=event, data=data)

    # --- deliveries -------------------------------------------------------------------------

    def send_test(self, *, principal: Principal, webhook_id: int) -> int:
        """Queue one signed `test` delivery to the webhook (whatever it subscribes to); one attempt.

        Raises:
            MissingScope, InvalidInput, NotFound.
        """
        self.require_scope(principal, WRITE, "test_webhook")
        webhook = self._own_webhook(principal, webhook_id)
        assert webhook.id is not None
        payload = envelope("test", TestData(test=True, webhook_id=webhook.id), self.clock())
        delivery_id = self.store.record_test_delivery(webhook=webhook, payload=payload, now=self.clock())
        self.on_recorded()
        return delivery_id

    def test_outcome(self, *, principal: Principal, delivery_id: int) -> TestOutcome:
        """Where a test delivery stands; `state` stays pending until its attempt is logged.

        Raises:
            NotFound: (delivery_id) for an unknown or foreign delivery.
        """
        found = self.store.get_delivery(team_id=principal.team_id, delivery_id=delivery_id)
        if found is None:
            raise NotFound("delivery_id", f"delivery {delivery_id} does not exist in this team")
        delivery, attempts = found
        last = attempts[-1] if attempts else None
        return TestOutcome(
            delivery_id=delivery_id,
            state=delivery.state,
            status_code=last.status_code if last else None,
            duration_ms=last.duration_ms if last else None,
            response_body=last.response_body if last else None,
            error=last.error if last else None,
        )

    def list_deliveries(
        self,
        *,
        principal: Principal,
        webhook_id: int,
        cursor: str | None = None,
        limit: int = LIST_LIMIT_DEFAULT,
        state: str | None = None,
        event: str | None = None,
    ) -> DeliveryPage:
        """One page of a webhook's delivery log, newest first, each with its attempts; `state`
        and `event` narrow it.

        Raises:
            MissingScope, InvalidInput (webhook_id, limit, cursor, state, event), NotFound.
        """
        self.require_scope(principal, READ, "list_deliveries")
        _validate_log_query(limit, state)
        if event is not None and event not in (*EVENT_NAMES, "test"):
            raise InvalidInput(
                "event", f"{event!r} is not an event; choose from {', '.join((*EVENT_NAMES, 'test'))}"
            )
        webhook = self._own_webhook(principal, webhook_id)
        assert webhook.id is not None
        return self._delivery_page(
            team_id=principal.team_id,
            webhook_id=webhook.id,
            cursor=cursor,
            limit=limit,
            state=state,
            event=event,
        )

    def delivery_log(
        self, *, webhook_id: int, limit: int = LIST_LIMIT_MAX, state: str | None = None
    ) -> DeliveryPage:
        """Operator view of a webhook's log (the CLI): no key, any team.

        Raises:
            InvalidInput, NotFound.
        """
        wid = _positive_id("webhook_id", webhook_id)
        _validate_log_query(limit, state)
        webhook = self.store.get_webhook_by_id(wid)
        if webhook is None:
            raise NotFound("webhook_id", f"webhook {wid} does not exist")
        return self._delivery_page(
            team_id=webhook.team_id, webhook_id=wid, cursor=None, limit=limit, state=state
        )

    def _delivery_page(
        self,
        *,
        team_id: int,
        webhook_id: int,
        cursor: str | None,
        limit: int,
        state: str | None,
        event: str | None = None,
    ) -> DeliveryPage:
        _validate_log_query(limit, state)
        now = self.clock()
        before = None
        # A cursor is bound to its filters too: one from another filter would skip rows.
        kind = f"deliveries:{webhook_id}" + (f":{state or ''}:{event or ''}" if state or event else "")
        if cursor is not None:
            if not isinstance(cursor, str) or not cursor:
                raise InvalidInput("cursor", "must be next_cursor from a previous page, or omitted")
            before = self.cursors.decode(cursor, kind=kind, team_id=team_id, now=now)
        rows = self.store.list_deliveries(
            webhook_id=webhook_id, before_id=before, limit=limit + 1, state=state, event=event
        )
        page = rows[:limit]
        next_cursor = None
        if len(rows) > limit:
            last = page[-1][0].id
            assert last is not None
            next_cursor = self.cursors.encode(kind=kind, team_id=team_id, after_id=last, now=now)
        return DeliveryPage(deliveries=[_delivery_public(d, a) for d, a in page], next_cursor=next_cursor)


def _summary(w: WebhookPublic, last: tuple[Delivery, DeliveryAttempt | None] | None) -> WebhookSummary:
    delivery = _delivery_public(last[0], [last[1]] if last[1] else []) if last else None
    return WebhookSummary(**w.model_dump(), last_delivery=delivery)


def _validate_log_query(limit: Any, state: Any) -> None:
    validate_limit(limit)
    if state is not None and state not in DELIVERY_STATES:
        raise InvalidInput("state", f"{state!r} is not a state; choose from {', '.join(DELIVERY_STATES)}")


def _delivery_public(d: Delivery, attempts: list[DeliveryAttempt]) -> DeliveryPublic:
    return DeliveryPublic(
        id=d.id or 0,
        webhook_id=d.webhook_id,
        event_id=d.event_id,
        event=d.event,
        state=d.state,
        is_test=d.is_test,
        redelivery_of=d.redelivery_of,
        note=d.note,
        created_at=d.created_at,
        next_attempt_at=d.next_attempt_at if d.state in OPEN_STATES else None,
        attempts=[AttemptPublic.model_validate(a) for a in attempts],
    )

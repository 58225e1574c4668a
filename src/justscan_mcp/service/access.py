"""Access use cases: teams, API keys, who a presented key is, and dashboard sessions."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from justscan_mcp.errors import InvalidInput, McpDisabled, NotFound, Unauthenticated
from justscan_mcp.models import (
    DEFAULT_KEY_SCOPES,
    ApiKey,
    ApiKeyCreated,
    ApiKeyPublic,
    DashboardSession,
    Operator,
    Principal,
    TeamPublic,
    UncheckedKey,
)
from justscan_mcp.security import (
    api_key_prefix,
    generate_api_key,
    hash_api_key,
    looks_like_api_key,
)
from justscan_mcp.service import validators
from justscan_mcp.service.base import UseCases
from justscan_mcp.store import LAST_USED_RESOLUTION

DASHBOARD_SESSION_TTL = timedelta(hours=12)


def _principal(key: ApiKey) -> Principal:
    assert key.id is not None
    return Principal(
        key_id=key.id,
        team_id=key.team_id,
        scopes=frozenset(key.scopes),
        mcp_enabled=key.mcp_enabled,
        label=key.name or f"{key.prefix}…",
    )


class AccessUseCases(UseCases):
    """Teams, keys, principals and dashboard sessions."""

    # --- teams ------------------------------------------------------------------------------

    def create_team(self, *, name: str) -> TeamPublic:
        """Raises: InvalidInput for an empty or overlong name; Conflict when it is taken."""
        checked = validators.name("name", name, required=True)
        assert checked is not None
        return TeamPublic.model_validate(self.store.create_team(name=checked, now=self.clock()))

    def list_teams(self) -> list[TeamPublic]:
        return [TeamPublic.model_validate(t) for t in self.store.list_teams()]

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
        scope_list = validators.scopes(scopes)
        name = validators.name("name", name, required=False)
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
        key_id = validators.positive_id("key", key_id)
        values: dict[str, Any] = {}
        if mcp_enabled is not None:
            values["mcp_enabled"] = bool(mcp_enabled)
        if scopes is not None:
            values["scopes"] = validators.scopes(scopes)
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
        key_id = validators.positive_id("key", key_id)
        existing = self.store.get_api_key(key_id)
        if existing is None:
            raise NotFound("key", f"API key {key_id} does not exist")
        if existing.revoked_at is not None:
            return ApiKeyPublic.model_validate(existing)
        key = self.store.update_api_key(key_id, revoked_at=self.clock())
        assert key is not None
        return ApiKeyPublic.model_validate(key)

    # --- who is calling ---------------------------------------------------------------------

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

    def identify_key(self, raw_key: str | None) -> UncheckedKey:
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
        return UncheckedKey(key_id=key.id)

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

    def operator(self, *, team_id: Any) -> Operator:
        """The operator acting for one team (the CLI acts as the operator, not as a key).

        Raises:
            InvalidInput, NotFound: (team) for a malformed or unknown team id.
        """
        return Operator(team_id=self._require_team(team_id))

    def team_name(self, team_id: int) -> str | None:
        """The team's name, for people to read (None once the team is gone)."""
        team = self.store.get_team(team_id)
        return team.name if team is not None else None

    @staticmethod
    def require_mcp(principal: Principal) -> None:
        """Raises: McpDisabled when the key's MCP switch is off."""
        if not principal.mcp_enabled:
            raise McpDisabled(
                f"MCP is not enabled for API key {principal.key_id}; turn it on on the API key page "
                f"or with `justscan-mcp key update {principal.key_id} --mcp`"
            )

    # --- dashboard sessions -----------------------------------------------------------------

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

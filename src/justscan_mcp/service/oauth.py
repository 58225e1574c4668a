"""OAuth 2.1 authorization server use cases: clients, consent, codes, token rotation, grants."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from justscan_mcp.client_documents import fetch_client_document, looks_like_document_url
from justscan_mcp.errors import InvalidInput, NotFound, OAuthRefused, Unauthenticated
from justscan_mcp.models import (
    OAuthClient,
    OAuthCode,
    OAuthGrant,
    OAuthRequest,
    OAuthToken,
    Principal,
)
from justscan_mcp.security import hash_api_key as token_hash
from justscan_mcp.service.base import UseCases

CLIENT_PREFIX = "jsc_"
CODE_PREFIX = "jsac_"
ACCESS_PREFIX = "jsat_"
REFRESH_PREFIX = "jsrt_"
ACCESS_TTL = timedelta(hours=1)
REFRESH_TTL = timedelta(days=30)
CODE_TTL = timedelta(minutes=5)
REQUEST_TTL = timedelta(minutes=10)
GRANT_LAST_USED_RESOLUTION = timedelta(seconds=60)
DOCUMENT_TTL = timedelta(hours=1)  # how long a fetched client metadata document is trusted

log = logging.getLogger(__name__)


def looks_like_access_token(value: str) -> bool:
    return value.startswith(ACCESS_PREFIX) and 20 <= len(value) <= 100


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    scopes: list[str]


@dataclass(frozen=True)
class CodeGrant:
    """What an authorization code stands for, for the token endpoint's checks."""

    client_id: str
    grant_id: int
    code_challenge: str
    redirect_uri: str
    redirect_uri_explicit: bool
    scopes: list[str]
    resource: str
    expires_at: datetime


@dataclass(frozen=True)
class RefreshGrant:
    client_id: str
    grant_id: int
    scopes: list[str]
    resource: str
    expires_at: datetime


@dataclass(frozen=True)
class TokenHolder:
    """A live access token: the grant, the key behind it and what it may do."""

    client_id: str
    grant_id: int
    key_id: int
    scopes: list[str]
    resource: str
    expires_at: datetime


@dataclass(frozen=True)
class Consent:
    """A consent request as the consent page shows it."""

    client_id: str
    client_name: str
    redirect_uri: str
    scopes: list[str]  # what the client asked for (all of a key's, when it named none)
    state: str | None


class OAuthUseCases(UseCases):
    """The authorization server. The resource it issues tokens for is `self.oauth_resource` (the
    public URL of `/mcp`); a token is only good there."""

    oauth_resource: str = ""

    if TYPE_CHECKING:  # provided by AccessUseCases, beside this class in `Service`

        def principal_for_key_id(self, key_id: int) -> Principal: ...

        @staticmethod
        def require_mcp(principal: Principal) -> None: ...

    # --- clients ------------------------------------------------------------------------------

    def register_oauth_client(
        self, *, document: Mapping[str, Any], secret: str | None, client_id: str | None = None
    ) -> str:
        """Store a client's metadata (RFC 7591) and the hash of its secret; returns its id (a new
        one unless the registration endpoint chose it)."""
        client_id = client_id or CLIENT_PREFIX + secrets.token_urlsafe(16)
        doc = {k: v for k, v in document.items() if k not in ("client_id", "client_secret")}
        self.store.add_oauth_client(
            OAuthClient(
                client_id=client_id,
                secret_hash=token_hash(secret) if secret else None,
                document=doc,
                created_at=self.clock(),
            )
        )
        return client_id

    def oauth_client(self, client_id: str) -> tuple[dict[str, Any], str | None] | None:
        """A client's metadata and its secret's hash, or None. A client_id that is a URL is a
        client ID metadata document: fetched under the webhook address rules, then kept for
        `DOCUMENT_TTL` (a failed fetch keeps an older copy out of use: None)."""
        found = self.store.get_oauth_client(client_id)
        if not looks_like_document_url(client_id):
            return (dict(found.document), found.secret_hash) if found is not None else None
        now = self.clock()
        if found is not None and now - found.created_at < DOCUMENT_TTL:
            return dict(found.document), None
        try:
            document = fetch_client_document(
                client_id, allow_private=self.settings.allow_private_targets, resolve=self.resolver
            )
        except InvalidInput as exc:
            log.warning("client metadata document refused: %s", exc.reason)
            return None
        doc = {k: v for k, v in document.items() if k not in ("client_id", "client_secret")}
        self.store.put_oauth_client(
            OAuthClient(client_id=client_id, secret_hash=None, document=doc, created_at=now)
        )
        return doc, None

    # --- consent ------------------------------------------------------------------------------

    def begin_authorization(self, *, client_id: str, request: Mapping[str, Any]) -> str:
        """Keep a checked authorization request until the person decides (10 minutes); returns
        the handle the consent page is opened with.

        Raises:
            OAuthRefused: invalid_target for a resource other than this server's.
        """
        resource = request.get("resource")
        if resource is not None and resource.rstrip("/") != self.oauth_resource.rstrip("/"):
            raise OAuthRefused("invalid_target", f"this server issues tokens for {self.oauth_resource} only")
        handle = secrets.token_urlsafe(24)
        now = self.clock()
        self.store.add_oauth_request(
            OAuthRequest(
                handle_hash=token_hash(handle),
                client_id=client_id,
                request=dict(request),
                expires_at=now + REQUEST_TTL,
            ),
            now=now,
        )
        return handle

    def consent(self, handle: str) -> Consent:
        """What the consent page shows.

        Raises:
            NotFound: (request) an unknown or expired request.
        """
        found = self.store.get_oauth_request(token_hash(handle), now=self.clock())
        client = self.store.get_oauth_client(found.client_id) if found is not None else None
        if found is None or client is None:
            raise NotFound("request", "this sign-in request has expired; start again from your app")
        req = found.request
        return Consent(
            client_id=found.client_id,
            client_name=str(client.document.get("client_name") or found.client_id),
            redirect_uri=str(req["redirect_uri"]),
            scopes=list(req.get("scopes") or []),
            state=req.get("state"),
        )

    def approve_authorization(
        self, *, principal: Principal, handle: str, scopes: Sequence[str]
    ) -> tuple[str, str, str | None]:
        """The person approved: a grant for their key's team with `scopes` (at most the key's),
        and a code. Returns (redirect URI, code, state).

        Raises:
            NotFound: (request) unknown or expired. InvalidInput: (scopes) none, or beyond the
                key's. Forbidden: the key's MCP switch is off.
        """
        self.require_mcp(principal)
        chosen = sorted(set(scopes))
        if not chosen:
            raise InvalidInput("scopes", "approve at least one scope")
        beyond = [s for s in chosen if not principal.has(s)]
        if beyond:
            raise InvalidInput("scopes", f"this API key does not have {', '.join(beyond)}")
        now = self.clock()
        found = self.store.take_oauth_request(token_hash(handle), now=now)
        if found is None:
            raise NotFound("request", "this sign-in request has expired; start again from your app")
        req = found.request
        code = CODE_PREFIX + secrets.token_urlsafe(32)
        self.store.add_grant_with_code(
            OAuthGrant(
                client_id=found.client_id,
                team_id=principal.team_id,
                key_id=principal.key_id,
                scopes=chosen,
                resource=self.oauth_resource,
                created_at=now,
            ),
            OAuthCode(
                code_hash=token_hash(code),
                grant_id=0,
                code_challenge=str(req["code_challenge"]),
                redirect_uri=str(req["redirect_uri"]),
                redirect_uri_explicit=bool(req.get("redirect_uri_explicit", True)),
                expires_at=now + CODE_TTL,
            ),
        )
        return str(req["redirect_uri"]), code, req.get("state")

    def deny_authorization(self, handle: str) -> tuple[str, str | None]:
        """The person said no: the request is dropped. Returns (redirect URI, state).

        Raises:
            NotFound: (request) unknown or expired.
        """
        found = self.store.take_oauth_request(token_hash(handle), now=self.clock())
        if found is None:
            raise NotFound("request", "this sign-in request has expired; start again from your app")
        return str(found.request["redirect_uri"]), found.request.get("state")

    # --- the token endpoint -------------------------------------------------------------------

    def load_code(self, *, client_id: str, code: str) -> CodeGrant | None:
        """The code's grant, or None for an unknown code or another client's. A code presented
        again after it was used revokes its grant: someone else may hold it (RFC 6749 §4.1.2)."""
        found = self.store.get_code(token_hash(code))
        if found is None:
            return None
        row, grant = found
        if grant.client_id != client_id or grant.id is None:
            return None
        if row.used_at is not None:
            self.store.revoke_grant(grant.id, now=self.clock())
            return None
        return CodeGrant(
            client_id=grant.client_id,
            grant_id=grant.id,
            code_challenge=row.code_challenge,
            redirect_uri=row.redirect_uri,
            redirect_uri_explicit=row.redirect_uri_explicit,
            scopes=list(grant.scopes),
            resource=grant.resource,
            expires_at=row.expires_at,
        )

    def redeem_code(self, *, code: str, grant: CodeGrant) -> TokenPair:
        """Use the code once and issue the first token pair.

        Raises:
            OAuthRefused: invalid_grant when it was used meanwhile (the grant is then revoked)
                or its grant is gone.
        """
        now = self.clock()
        if not self.store.use_code(token_hash(code), now=now):
            self.store.revoke_grant(grant.grant_id, now=now)
            raise OAuthRefused("invalid_grant", "the authorization code was already used")
        live = self.store.get_grant(grant.grant_id)
        if live is None or live.revoked_at is not None:
            raise OAuthRefused("invalid_grant", "the authorization was revoked")
        self._key_of(live)
        pair, rows = self._new_pair(grant.grant_id, list(grant.scopes), now)
        self.store.add_tokens(rows)
        return pair

    def load_refresh(self, *, client_id: str, token: str) -> RefreshGrant | None:
        """The refresh token's grant, or None. A used (rotated) refresh token presented again
        revokes the whole grant: the old token leaked, or the client is confused."""
        found = self.store.get_token(token_hash(token))
        if found is None:
            return None
        row, grant = found
        if row.kind != "refresh" or grant.client_id != client_id or grant.id is None:
            return None
        if row.used_at is not None:
            self.store.revoke_grant(grant.id, now=self.clock())
            return None
        if grant.revoked_at is not None:
            return None
        return RefreshGrant(
            client_id=grant.client_id,
            grant_id=grant.id,
            scopes=list(grant.scopes),
            resource=grant.resource,
            expires_at=row.expires_at,
        )

    def rotate_refresh(self, *, token: str, grant: RefreshGrant, scopes: Sequence[str]) -> TokenPair:
        """Use the refresh token once: a new pair with `scopes` (at most the grant's).

        Raises:
            OAuthRefused: invalid_grant when it was used meanwhile (the grant is then revoked),
                or the grant or its key was revoked; invalid_scope beyond the grant.
        """
        now = self.clock()
        if any(s not in grant.scopes for s in scopes):
            raise OAuthRefused("invalid_scope", "a refreshed token cannot have more scopes than its grant")
        live = self.store.get_grant(grant.grant_id)
        if live is None or live.revoked_at is not None:
            raise OAuthRefused("invalid_grant", "the authorization was revoked")
        self._key_of(live)
        pair, rows = self._new_pair(grant.grant_id, list(scopes) or list(grant.scopes), now)
        if not self.store.rotate_refresh(token_hash(token), rows, now=now):
            self.store.revoke_grant(grant.grant_id, now=now)
            raise OAuthRefused("invalid_grant", "the refresh token was already used")
        return pair

    def _new_pair(
        self, grant_id: int, scopes: list[str], now: datetime
    ) -> tuple[TokenPair, list[OAuthToken]]:
        access = ACCESS_PREFIX + secrets.token_urlsafe(32)
        refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
        rows = [
            OAuthToken(
                token_hash=token_hash(access),
                grant_id=grant_id,
                kind="access",
                created_at=now,
                expires_at=now + ACCESS_TTL,
            ),
            OAuthToken(
                token_hash=token_hash(refresh),
                grant_id=grant_id,
                kind="refresh",
                created_at=now,
                expires_at=now + REFRESH_TTL,
            ),
        ]
        pair = TokenPair(access, refresh, int(ACCESS_TTL.total_seconds()), sorted(scopes))
        return pair, rows

    def _key_of(self, grant: OAuthGrant) -> Principal:
        """The key behind a grant, now.

        Raises:
            OAuthRefused: invalid_grant when the key was revoked.
        """
        try:
            return self.principal_for_key_id(grant.key_id)
        except Unauthenticated as exc:
            raise OAuthRefused("invalid_grant", "the API key behind this authorization was revoked") from exc

    # --- the resource server ------------------------------------------------------------------

    def verify_access_token(self, token: str) -> TokenHolder | None:
        """A live access token for this server's resource: not expired, its grant not revoked,
        its key not revoked. None otherwise."""
        if not looks_like_access_token(token):
            return None
        found = self.store.get_token(token_hash(token))
        if found is None:
            return None
        row, grant = found
        now = self.clock()
        if row.kind != "access" or row.expires_at <= now or grant.revoked_at is not None or grant.id is None:
            return None
        if grant.resource.rstrip("/") != self.oauth_resource.rstrip("/"):
            return None  # issued for another audience
        if grant.last_used_at is None or now - grant.last_used_at >= GRANT_LAST_USED_RESOLUTION:
            self.store.touch_grant(grant.id, now=now)
        return TokenHolder(
            client_id=grant.client_id,
            grant_id=grant.id,
            key_id=grant.key_id,
            scopes=list(grant.scopes),
            resource=grant.resource,
            expires_at=row.expires_at,
        )

    def principal_for_grant(self, grant_id: int) -> Principal:
        """The caller an OAuth token acts as: its key, with the grant's scopes (never more than
        the key has now).

        Raises:
            Unauthenticated: the grant or its key was revoked.
        """
        grant = self.store.get_grant(grant_id)
        if grant is None or grant.revoked_at is not None:
            raise Unauthenticated("this authorization was revoked; connect the app again")
        key = self.principal_for_key_id(grant.key_id)
        return key.model_copy(update={"scopes": key.scopes & frozenset(grant.scopes)})

    # --- connected apps -----------------------------------------------------------------------

    def connected_apps(self, *, team_id: int | None, limit: int = 1000) -> list[dict[str, Any]]:
        """Live grants (a team's; every team's for the operator, team_id None): client, scopes,
        key, created and last used."""
        return [
            {
                "grant_id": g.id,
                "team_id": g.team_id,
                "client_id": g.client_id,
                "client_name": doc.get("client_name") or g.client_id,
                "scopes": list(g.scopes),
                "key_id": g.key_id,
                "created_at": g.created_at,
                "last_used_at": g.last_used_at,
            }
            for g, doc in self.store.live_grants(team_id=team_id, limit=limit)
        ]

    def revoke_connected_app(self, *, grant_id: int, team_id: int | None) -> None:
        """Revoke a grant (of that team; any team's for the operator, team_id None).

        Raises:
            NotFound: (grant_id).
        """
        if not self.store.revoke_grant(grant_id, now=self.clock(), team_id=team_id):
            raise NotFound("grant_id", f"connected app {grant_id} does not exist")

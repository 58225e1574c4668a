"""OAuth state: clients, consent requests, grants, codes and tokens (codes and tokens by hash)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, update
from sqlmodel import col, select

from justscan_mcp.models import OAuthClient, OAuthCode, OAuthGrant, OAuthRequest, OAuthToken
from justscan_mcp.store.db import Database


class OAuthRepository(Database):
    """The authorization server's rows. Single use is enforced by conditional updates (`used_at
    IS NULL`), never by a read followed by a write, so two concurrent redemptions of one code or
    refresh token cannot both succeed."""

    # --- clients and consent requests -------------------------------------------------------

    def add_oauth_client(self, client: OAuthClient) -> None:
        """Raises: Conflict (an id taken), StoreUnavailable."""
        with self.session(write=True) as s:
            s.add(client)

    def put_oauth_client(self, client: OAuthClient) -> None:
        """Insert or replace (a refreshed client metadata document)."""
        with self.session(write=True) as s:
            s.merge(client)

    def get_oauth_client(self, client_id: str) -> OAuthClient | None:
        with self.session() as s:
            return s.get(OAuthClient, client_id)

    def add_oauth_request(self, request: OAuthRequest, *, now: datetime) -> None:
        """Store a consent request, and drop expired ones (they are few and short-lived)."""
        with self.session(write=True) as s:
            s.execute(delete(OAuthRequest).where(col(OAuthRequest.expires_at) < now))
            s.add(request)

    def get_oauth_request(self, handle_hash: str, *, now: datetime) -> OAuthRequest | None:
        with self.session() as s:
            found = s.get(OAuthRequest, handle_hash)
            return found if found is not None and found.expires_at > now else None

    def take_oauth_request(self, handle_hash: str, *, now: datetime) -> OAuthRequest | None:
        """The request, deleted in the same transaction: consent is given once."""
        with self.session(write=True) as s:
            found = s.get(OAuthRequest, handle_hash)
            if found is None:
                return None
            s.delete(found)
            return found if found.expires_at > now else None

    # --- grants, codes and tokens -------------------------------------------------------------

    def add_grant_with_code(self, grant: OAuthGrant, code: OAuthCode) -> int:
        """A new grant and its authorization code, in one transaction. Returns the grant id."""
        with self.session(write=True) as s:
            s.add(grant)
            s.flush()
            assert grant.id is not None
            code.grant_id = grant.id
            s.add(code)
            return grant.id

    def get_grant(self, grant_id: int) -> OAuthGrant | None:
        with self.session() as s:
            return s.get(OAuthGrant, grant_id)

    def get_code(self, code_hash: str) -> tuple[OAuthCode, OAuthGrant] | None:
        with self.session() as s:
            row = s.exec(
                select(OAuthCode, OAuthGrant)
                .join(OAuthGrant, col(OAuthGrant.id) == col(OAuthCode.grant_id))
                .where(col(OAuthCode.code_hash) == code_hash)
            ).first()
            return (row[0], row[1]) if row is not None else None

    def use_code(self, code_hash: str, *, now: datetime) -> bool:
        """Mark the code used; False when it already was (or is gone)."""
        with self.session(write=True) as s:
            done = s.execute(
                update(OAuthCode)
                .where(col(OAuthCode.code_hash) == code_hash)
                .where(col(OAuthCode.used_at).is_(None))
                .values(used_at=now)
            )
            return bool(done.rowcount)  # type: ignore[attr-defined]

    def add_tokens(self, tokens: Sequence[OAuthToken]) -> None:
        with self.session(write=True) as s:
            s.add_all(list(tokens))

    def get_token(self, token_hash: str) -> tuple[OAuthToken, OAuthGrant] | None:
        with self.session() as s:
            row = s.exec(
                select(OAuthToken, OAuthGrant)
                .join(OAuthGrant, col(OAuthGrant.id) == col(OAuthToken.grant_id))
                .where(col(OAuthToken.token_hash) == token_hash)
            ).first()
            return (row[0], row[1]) if row is not None else None

    def rotate_refresh(self, token_hash: str, replacement: Sequence[OAuthToken], *, now: datetime) -> bool:
        """Mark a refresh token used and store its replacements, in one transaction; False (and
        nothing stored) when it was already used."""
        with self.session(write=True) as s:
            done = s.execute(
                update(OAuthToken)
                .where(col(OAuthToken.token_hash) == token_hash)
                .where(col(OAuthToken.kind) == "refresh")
                .where(col(OAuthToken.used_at).is_(None))
                .values(used_at=now)
            )
            if not done.rowcount:  # type: ignore[attr-defined]
                return False
            s.add_all(list(replacement))
            return True

    def revoke_grant(self, grant_id: int, *, now: datetime, team_id: int | None = None) -> bool:
        """Revoke a grant (of that team, when given): its tokens stop working at once. False
        when there is no such grant."""
        with self.session(write=True) as s:
            found = s.get(OAuthGrant, grant_id)
            if found is None or (team_id is not None and found.team_id != team_id):
                return False
            if found.revoked_at is None:
                found.revoked_at = now
                s.add(found)
            return True

    def touch_grant(self, grant_id: int, *, now: datetime) -> None:
        with self.session(write=True) as s:
            s.execute(update(OAuthGrant).where(col(OAuthGrant.id) == grant_id).values(last_used_at=now))

    def live_grants(
        self, *, team_id: int | None, limit: int = 1000
    ) -> list[tuple[OAuthGrant, dict[str, Any]]]:
        """Live grants (of one team, or of all for the operator) with their client's document,
        newest first."""
        with self.session() as s:
            q = (
                select(OAuthGrant, OAuthClient)
                .join(OAuthClient, col(OAuthClient.client_id) == col(OAuthGrant.client_id))
                .where(col(OAuthGrant.revoked_at).is_(None))
            )
            if team_id is not None:
                q = q.where(col(OAuthGrant.team_id) == team_id)
            rows = s.exec(q.order_by(col(OAuthGrant.id).desc()).limit(limit)).all()
            return [(g, dict(c.document)) for g, c in rows]

"""Webhook use cases: create, read, list, change, rotate the secret, delete."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from justscan_mcp.errors import InvalidInput
from justscan_mcp.inputs import (
    DEFAULT_ROTATION_GRACE,
    SecretRotationInput,
    WebhookChange,
    WebhookCreate,
    WebhookPageQuery,
    WebhookRef,
)
from justscan_mcp.models import (
    LIST_LIMIT_DEFAULT,
    Caller,
    SecretRotated,
    Webhook,
    WebhookCreated,
    WebhookDeleted,
    WebhookPage,
    WebhookPublic,
)
from justscan_mcp.security import generate_webhook_secret
from justscan_mcp.service.base import UseCases, webhook_not_found
from justscan_mcp.service.validators import parse
from justscan_mcp.targets import validate_webhook_url

UPDATABLE = ("url", "events", "description", "active", "rate_limit")


class WebhookUseCases(UseCases):
    """A team's webhooks. Scopes are checked by `operations.invoke`, the one gate."""

    def _checked_url(self, url: str) -> str:
        return validate_webhook_url(
            url, allow_private=self.settings.allow_private_targets, resolve=self.resolver
        )

    def create_webhook(
        self,
        *,
        principal: Caller,
        url: str,
        events: Sequence[str],
        description: str | None = None,
        rate_limit: int | None = None,
    ) -> WebhookCreated:
        """Create a webhook for the caller's team; the result is the only place its secret is shown.

        Raises:
            InvalidInput (url, events, description, rate_limit).
        """
        given = parse(
            WebhookCreate,
            {"url": url, "events": events, "description": description, "rate_limit": rate_limit},
        )
        checked_url = self._checked_url(given.url)
        now = self.clock()
        webhook = self.store.add_webhook(
            Webhook(
                team_id=principal.team_id,
                url=checked_url,
                events=list(given.events),
                description=given.description,
                rate_limit=given.rate_limit,
                secret=generate_webhook_secret(),
                active=True,
                created_at=now,
                updated_at=now,
            )
        )
        return WebhookCreated.model_validate(webhook)

    def get_webhook(self, *, principal: Caller, webhook_id: int) -> WebhookPublic:
        """Raises: InvalidInput, NotFound (also for another team's id)."""
        given = parse(WebhookRef, {"webhook_id": webhook_id})
        return WebhookPublic.model_validate(self._own_webhook(principal.team_id, given.webhook_id))

    def list_webhooks(
        self, *, principal: Caller, cursor: str | None = None, limit: int = LIST_LIMIT_DEFAULT
    ) -> WebhookPage:
        """One page of the team's webhooks, oldest first; pass `next_cursor` back for the next.

        Raises:
            InvalidInput (limit, cursor).
        """
        given = parse(WebhookPageQuery, {"cursor": cursor, "limit": limit})
        limit = given.limit
        now = self.clock()
        after = 0
        if given.cursor is not None:
            if not given.cursor:
                raise InvalidInput("cursor", "must be next_cursor from a previous page, or omitted")
            after = self.cursors.decode(given.cursor, kind="webhooks", team_id=principal.team_id, now=now)
        rows = self.store.list_webhooks(team_id=principal.team_id, after_id=after, limit=limit + 1)
        page = list(rows[:limit])
        next_cursor = None
        if len(rows) > limit:
            last = page[-1].id
            assert last is not None
            next_cursor = self.cursors.encode(
                kind="webhooks", team_id=principal.team_id, after_id=last, now=now
            )
        return WebhookPage(webhooks=page, next_cursor=next_cursor)

    def update_webhook(
        self, *, principal: Caller, webhook_id: int, changes: Mapping[str, Any]
    ) -> WebhookPublic:
        """Change the fields given (url, events, description, active, rate_limit), each checked as
        strictly as at creation (a null rate_limit removes the limit). Deactivating also ends the webhook's queued deliveries.

        Raises:
            InvalidInput (the field, or ``body`` when nothing or an unknown field is given), NotFound.
        """
        if "webhook_id" in changes:
            raise InvalidInput(
                "webhook_id", f"is not a field that can be changed; use {', '.join(UPDATABLE)}"
            )
        given = parse(WebhookChange, {"webhook_id": webhook_id, **changes})
        named = [f for f in UPDATABLE if f in given.model_fields_set]
        if not named:
            raise InvalidInput("body", f"give at least one of {', '.join(UPDATABLE)}")
        values: dict[str, Any] = {name: getattr(given, name) for name in named}
        if values.get("active", False) is None:
            raise InvalidInput("active", "must be true or false")
        for name in ("url", "events"):
            if name in values and values[name] is None:
                raise InvalidInput(name, "cannot be cleared; give a new value or leave it out")
        if "url" in values:
            values["url"] = self._checked_url(values["url"])
        webhook = self.store.update_webhook(
            team_id=principal.team_id, webhook_id=given.webhook_id, now=self.clock(), **values
        )
        if webhook is None:
            raise webhook_not_found(given.webhook_id)
        return WebhookPublic.model_validate(webhook)

    def rotate_secret(
        self, *, principal: Caller, webhook_id: int, grace_seconds: int = DEFAULT_ROTATION_GRACE
    ) -> SecretRotated:
        """Give the webhook a new secret. X-Webhook-Signature uses the new one at once; the old one
        keeps signing `webhook-signature` beside it for `grace_seconds` (0 ends it now).

        Raises:
            InvalidInput (webhook_id, grace_seconds), NotFound.
        """
        given = parse(SecretRotationInput, {"webhook_id": webhook_id, "grace_seconds": grace_seconds})
        wid = given.webhook_id
        now = self.clock()
        new = generate_webhook_secret()
        until = now + timedelta(seconds=given.grace_seconds) if given.grace_seconds else None
        # One statement: two rotations at once each keep the secret the other made (read, then
        # write in a second transaction lost one of them).
        if not self.store.rotate_secret(
            team_id=principal.team_id, webhook_id=wid, secret=new, grace_until=until, now=now
        ):
            raise webhook_not_found(wid)
        return SecretRotated(webhook_id=wid, secret=new, previous_secret_expires_at=until)

    def delete_webhook(self, *, principal: Caller, webhook_id: int) -> WebhookDeleted:
        """Raises: InvalidInput, NotFound (also for another team's id)."""
        wid = parse(WebhookRef, {"webhook_id": webhook_id}).webhook_id
        if not self.store.delete_webhook(team_id=principal.team_id, webhook_id=wid):
            raise webhook_not_found(wid)
        return WebhookDeleted(deleted=True, webhook_id=wid)

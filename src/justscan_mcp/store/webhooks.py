"""Webhooks: a team's endpoints, their secrets and their on/off switch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, update
from sqlmodel import col, select

from justscan_mcp.models import (
    OPEN_STATES,
    Delivery,
    Webhook,
    WebhookPublic,
)
from justscan_mcp.store.db import Database

log = logging.getLogger(__name__)

# What list_webhooks reads: the public model's fields, each a column of the same name.
_PUBLIC_COLUMNS = tuple(WebhookPublic.model_fields)
_PUBLIC_TIMES = ("failing_since", "created_at", "updated_at")


class WebhookRepository(Database):
    """Webhooks, scoped to a team except where the operator's view says otherwise."""

    # --- webhooks ---------------------------------------------------------------------------

    def add_webhook(self, webhook: Webhook) -> Webhook:
        with self.session() as s:
            s.add(webhook)
            s.flush()
        return webhook

    def get_webhook(self, *, team_id: int, webhook_id: int) -> Webhook | None:
        with self.session() as s:
            return s.exec(
                select(Webhook).where(Webhook.id == webhook_id).where(Webhook.team_id == team_id)
            ).first()

    def list_webhooks(self, *, team_id: int, after_id: int, limit: int) -> list[WebhookPublic]:
        """Up to `limit` webhooks of the team with id > `after_id`, in id order (keyset pagination).

        Driver SQL straight into the public model: an assistant lists webhooks on nearly every
        turn, and the ORM's objects made a page of 51 cost 0.87 ms on SQLite against 0.42 here
        (1.4 against 1.0 ms on PostgreSQL; bench/run.py's MCP rows).

        Raises:
            StoreUnavailable.
        """
        # A range, not `=`, for the same planner reason as in list_deliveries.
        sql = (
            f"SELECT {', '.join(_PUBLIC_COLUMNS)} FROM webhooks "  # noqa: S608 (constants and marks)
            f"WHERE team_id >= {self._mark} AND team_id <= {self._mark} AND id > {self._mark} "
            f"ORDER BY team_id, id LIMIT {self._mark}"
        )
        with self._driver(write=False) as cur:
            cur.execute(sql, (team_id, team_id, after_id, limit))
            rows = cur.fetchall()
        return [
            WebhookPublic.model_validate(
                self._decoded(_PUBLIC_COLUMNS, row, json_columns=("events",), time_columns=_PUBLIC_TIMES)
            )
            for row in rows
        ]

    def update_webhook(
        self, *, team_id: int, webhook_id: int, now: datetime, **values: Any
    ) -> Webhook | None:
        """Change fields of a team's webhook. Setting `active=False` also ends every open
        delivery of it, leased or not (state failed, with a note), in the same transaction, so an
        inactive webhook receives nothing new. A send already in flight keeps its lease: its
        attempt is logged when it finishes, and the delivery stays `failed`.

        Raises:
            StoreUnavailable.
        """
        with self.session(write=True) as s:
            webhook = s.exec(
                select(Webhook).where(Webhook.id == webhook_id).where(Webhook.team_id == team_id)
            ).first()
            if webhook is None:
                return None
            was_active = webhook.active
            for name, value in values.items():
                setattr(webhook, name, value)
            if values.get("active") is True and not was_active:
                # Switched on by hand: the reason is gone, and the streak starts again from the
                # next failure (else the old streak would switch it off again at once).
                webhook.disabled_reason = None
                webhook.failing_since = None
            if "rate_limit" in values:
                # A new limit starts with a full bucket and an open gate.
                webhook.rate_tat = None
                webhook.rate_open_at = None
            webhook.updated_at = now
            s.add(webhook)
            if values.get("active") is False:
                s.execute(
                    update(Delivery)
                    .where(col(Delivery.webhook_id) == webhook_id)
                    .where(col(Delivery.state).in_(OPEN_STATES))
                    # A test delivery goes out whatever `active` says: it is not cancelled.
                    .where(col(Delivery.is_test).is_(False))
                    .values(
                        state="failed",
                        next_attempt_at=None,
                        note="cancelled: webhook deactivated",
                        updated_at=now,
                    )
                )
            return webhook

    def rotate_secret(
        self, *, team_id: int, webhook_id: int, secret: str, grace_until: datetime | None, now: datetime
    ) -> bool:
        """Make `secret` the signing secret, keeping the current one as the previous secret until
        `grace_until` (none: dropped at once). One UPDATE whose SET reads the row as it is when
        the update runs, so concurrent rotations each keep the secret the other just made.
        Returns False when the webhook does not exist in the team.

        Raises:
            StoreUnavailable.
        """
        with self.session(write=True) as s:
            result = s.execute(
                update(Webhook)
                .where(col(Webhook.id) == webhook_id)
                .where(col(Webhook.team_id) == team_id)
                .values(
                    secret=secret,
                    previous_secret=col(Webhook.secret) if grace_until is not None else None,
                    previous_secret_expires_at=grace_until,
                    updated_at=now,
                )
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def delete_webhook(self, *, team_id: int, webhook_id: int) -> bool:
        with self.session() as s:
            result = s.execute(
                delete(Webhook).where(col(Webhook.id) == webhook_id).where(col(Webhook.team_id) == team_id)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def all_webhooks(self, *, after_id: int = 0, limit: int) -> Sequence[Webhook]:
        """Operator view: every team's webhooks, oldest first (keyset on id, after `after_id`)."""
        with self.session() as s:
            return s.exec(
                select(Webhook).where(col(Webhook.id) > after_id).order_by(col(Webhook.id)).limit(limit)
            ).all()

    def get_webhook_by_id(self, webhook_id: int) -> Webhook | None:
        """Operator access (CLI), not scoped to a team."""
        with self.session() as s:
            return s.get(Webhook, webhook_id)

    def switched_off(self, *, limit: int) -> Sequence[Webhook]:
        """Operator view: webhooks switched off for failing, longest failing first."""
        with self.session() as s:
            return s.exec(
                select(Webhook)
                .where(col(Webhook.disabled_reason) == "failing")
                .order_by(col(Webhook.failing_since), col(Webhook.id))
                .limit(limit)
            ).all()

    def disable_failing(self, *, started_before: datetime, now: datetime, min_failed: int = 3) -> list[int]:
        """Switch off every active webhook whose failure streak began before `started_before`
        and holds at least `min_failed` failed deliveries (not tests, not cancelled by hand):
        `active` false, `disabled_reason` "failing", and its open deliveries end `failed` with a
        note naming the streak. Nothing is deleted: recovery re-sends them. Returns the ids.

        Raises:
            StoreUnavailable.
        """
        with self.session(write=True) as s:
            failed = (
                select(func.count())
                .select_from(Delivery)
                .where(col(Delivery.webhook_id) == col(Webhook.id))
                .where(col(Delivery.state) == "failed")
                .where(col(Delivery.is_test).is_(False))
                .where(col(Delivery.updated_at) >= col(Webhook.failing_since))
                .where(or_(col(Delivery.note).is_(None), ~col(Delivery.note).startswith("cancelled")))
                .scalar_subquery()
            )
            hooks = s.exec(
                select(Webhook)
                .where(col(Webhook.active))
                .where(col(Webhook.failing_since).is_not(None))
                .where(col(Webhook.failing_since) < started_before)
                .where(failed >= min_failed)
                .with_for_update()
            ).all()
            for hook in hooks:
                assert hook.failing_since is not None
                since = hook.failing_since.isoformat(timespec="seconds").replace("+00:00", "Z")
                hook.active = False
                hook.disabled_reason = "failing"
                hook.updated_at = now
                s.add(hook)
                s.execute(
                    update(Delivery)
                    .where(col(Delivery.webhook_id) == hook.id)
                    .where(col(Delivery.state).in_(OPEN_STATES))
                    .where(col(Delivery.is_test).is_(False))
                    .values(
                        state="failed",
                        next_attempt_at=None,
                        note=f"cancelled: webhook disabled after failing since {since}",
                        updated_at=now,
                    )
                )
            return [h.id for h in hooks if h.id is not None]

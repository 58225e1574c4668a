"""The delivery log: reading deliveries and their attempts (writing them is the outbox's job)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlmodel import col, select

from justscan_mcp.models import (
    FAILING_STATES_SQL,
    OPEN_STATES_SQL,
    Delivery,
    DeliveryAttempt,
    Webhook,
)
from justscan_mcp.store.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsCounts:
    """A webhook's counts since a time: the deliveries created since, by (state, UTC hour
    'YYYY-MM-DD HH'); the attempts started since, by (outcome class, hour) with the sum of their
    durations; and those attempts' duration percentiles (ms, nearest rank)."""

    deliveries: list[tuple[str, str, int]]
    attempts: list[tuple[str, str, int, int]]
    p50: int | None
    p95: int | None


@dataclass(frozen=True)
class OperationsCounts:
    """What the operator's views count across teams at one moment (see `operations_snapshot`)."""

    open_by_state: dict[str, int]
    oldest_due_at: datetime | None  # the oldest due, unclaimed delivery of an active webhook
    attempts_by_outcome: dict[str, int]  # attempts started since the window's start
    # (webhook id, team id, failed attempts in the window, failing since), most failures first.
    top_failing: list[tuple[int, int, int, datetime | None]]
    switched_off: int  # webhooks auto-disabled for failing


class DeliveryLog(Database):
    """Reads of deliveries and attempts, for the log, the dashboard and the admin area."""

    def get_delivery(
        self, *, team_id: int, delivery_id: int
    ) -> tuple[Delivery, list[DeliveryAttempt]] | None:
        with self.session(snapshot=True) as s:
            d = s.exec(
                select(Delivery).where(Delivery.id == delivery_id).where(Delivery.team_id == team_id)
            ).first()
            if d is None:
                return None
            attempts = s.exec(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.delivery_id == delivery_id)
                .order_by(col(DeliveryAttempt.number))
            ).all()
            return d, list(attempts)

    def list_deliveries(
        self,
        *,
        webhook_id: int,
        before_id: int | None,
        limit: int,
        state: str | None = None,
        event: str | None = None,
    ) -> list[tuple[Delivery, list[DeliveryAttempt]]]:
        """A webhook's deliveries, newest first (keyset on id), each with its attempts."""
        with self.session(snapshot=True) as s:
            # The webhook filter is written as a range on purpose. With `webhook_id = X`, PostgreSQL
            # treats webhook_id as a constant, and ORDER BY id may then walk the primary key
            # backwards and filter, scanning every newer row of other webhooks first (~50 ms at 1M
            # rows, also the max() form). A range keeps (webhook_id, id) a real ordering that only
            # the composite index provides: 0.04 ms.
            q = (
                select(Delivery)
                .where(col(Delivery.webhook_id) >= webhook_id)
                .where(col(Delivery.webhook_id) <= webhook_id)
            )
            if before_id is not None:
                q = q.where(col(Delivery.id) < before_id)
            if state is not None:
                q = q.where(Delivery.state == state)
            if event is not None:
                q = q.where(Delivery.event == event)
            rows = s.exec(
                q.order_by(col(Delivery.webhook_id).desc(), col(Delivery.id).desc()).limit(limit)
            ).all()
            by_delivery: dict[int, list[DeliveryAttempt]] = {d.id: [] for d in rows if d.id is not None}
            if by_delivery:
                for a in s.exec(
                    select(DeliveryAttempt)
                    .where(col(DeliveryAttempt.delivery_id).in_(list(by_delivery)))
                    .order_by(col(DeliveryAttempt.delivery_id), col(DeliveryAttempt.number))
                ).all():
                    by_delivery[a.delivery_id].append(a)
            return [(d, by_delivery[d.id]) for d in rows if d.id is not None]

    def last_deliveries(
        self, webhook_ids: Sequence[int]
    ) -> dict[int, tuple[Delivery, DeliveryAttempt | None]]:
        """Each webhook's newest delivery and that delivery's latest attempt (the "last outcome"
        column): two queries for the whole page, each webhook's newest delivery found by one
        descent of (webhook_id, id)."""
        if not webhook_ids:
            return {}
        with self.session(snapshot=True) as s:
            # A correlated subquery per listed webhook, on both backends. The webhook filter is a
            # range for the planner reason given in list_deliveries.
            inner = Delivery.__table__.alias("newest")  # type: ignore[attr-defined]
            newest = (
                select(inner.c.id)
                .where(inner.c.webhook_id >= col(Webhook.id))
                .where(inner.c.webhook_id <= col(Webhook.id))
                .order_by(inner.c.webhook_id.desc(), inner.c.id.desc())
                .limit(1)
                .scalar_subquery()
            )
            ids = [i for i in s.exec(select(newest).where(col(Webhook.id).in_(list(webhook_ids)))).all() if i]
            if not ids:
                return {}
            rows = s.exec(select(Delivery).where(col(Delivery.id).in_(ids))).all()
            latest: dict[int, DeliveryAttempt] = {}
            for a in s.exec(
                select(DeliveryAttempt)
                .where(col(DeliveryAttempt.delivery_id).in_(ids))
                .order_by(col(DeliveryAttempt.delivery_id), col(DeliveryAttempt.number))
            ).all():
                latest[a.delivery_id] = a
            return {d.webhook_id: (d, latest.get(d.id or 0)) for d in rows}

    def failing_deliveries(
        self, *, before_id: int | None, limit: int
    ) -> list[tuple[Delivery, DeliveryAttempt | None, str]]:
        """Operator view: failed and retrying deliveries of every team, newest first (keyset on
        id, below `before_id`), each with its latest attempt and its webhook's URL. The walk
        follows the partial index `ix_deliveries_failing`; two queries for the page."""
        with self.session(snapshot=True) as s:
            q = (
                select(Delivery, Webhook.url)
                .join(Webhook, col(Webhook.id) == col(Delivery.webhook_id))
                # Literal states, so both databases can match the partial index's predicate.
                .where(text(FAILING_STATES_SQL.replace("state", "deliveries.state")))
            )
            if before_id is not None:
                q = q.where(col(Delivery.id) < before_id)
            rows = s.exec(q.order_by(col(Delivery.id).desc()).limit(limit)).all()
            latest: dict[int, DeliveryAttempt] = {}
            ids = [d.id for d, _ in rows if d.id is not None]
            if ids:
                for a in s.exec(
                    select(DeliveryAttempt)
                    .where(col(DeliveryAttempt.delivery_id).in_(ids))
                    .order_by(col(DeliveryAttempt.number))
                ).all():
                    latest[a.delivery_id] = a
            return [(d, latest.get(d.id or 0), url) for d, url in rows]

    def webhook_stats(self, *, webhook_id: int, since: datetime) -> StatsCounts:
        """Counts for one webhook since `since`: its deliveries created since, from the index
        (webhook_id, created_at, state), and its attempts started since, from the index
        (webhook_id, started_at, outcome, duration_ms). Each is read from its index alone.

        Raises:
            StoreUnavailable.
        """
        m = self._mark
        if self.backend == "postgresql":
            hour = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24')"
        else:  # stored as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC)
            hour = "substr({}, 1, 13)"
        deliveries_sql = (
            f"SELECT state, {hour.format('created_at')} AS h, count(*) FROM deliveries"  # noqa: S608
            f" WHERE webhook_id = {m} AND created_at >= {m} GROUP BY state, h"
        )
        attempts = f"FROM delivery_attempts WHERE webhook_id = {m} AND started_at >= {m}"
        params = (webhook_id, self._dt_bind(since))
        # Three reads that must agree: counts, then the percentiles of the same attempts.
        with self._driver(write=False, snapshot=True) as cur:
            cur.execute(deliveries_sql, params)
            deliveries = [(state, h, n) for state, h, n in cur.fetchall()]
            cur.execute(
                f"SELECT outcome, {hour.format('started_at')} AS h, count(*), sum(duration_ms) {attempts}"
                " GROUP BY outcome, h",
                params,
            )
            tried = [(c, h, n, int(ms)) for c, h, n, ms in cur.fetchall()]
            total = sum(n for _, _, n, _ in tried)
            p50 = p95 = None
            if total and self.backend == "postgresql":
                cur.execute(
                    "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY duration_ms),"
                    f" percentile_disc(0.95) WITHIN GROUP (ORDER BY duration_ms) {attempts}",
                    params,
                )
                p50, p95 = cur.fetchone()
            elif total:
                cur.execute(f"SELECT duration_ms {attempts} ORDER BY duration_ms", params)
                durations = [row[0] for row in cur.fetchall()]
                p50, p95 = (durations[max(0, math.ceil(p * len(durations)) - 1)] for p in (0.5, 0.95))
        return StatsCounts(deliveries=deliveries, attempts=tried, p50=p50, p95=p95)

    def finished_by_team(self, *, team_ids: Sequence[int], since: datetime) -> dict[int, tuple[int, int]]:
        """(succeeded, failed) deliveries created since `since`, per team: through each team's
        webhooks on the index (webhook_id, created_at, state).

        Raises:
            StoreUnavailable.
        """
        if not team_ids:
            return {}
        m = self._mark
        with self._driver(write=False) as cur:
            cur.execute(
                "SELECT w.team_id, d.state, count(*) FROM webhooks w JOIN deliveries d"  # noqa: S608
                f" ON d.webhook_id = w.id AND d.created_at >= {m}"
                f" WHERE w.team_id IN ({self._marks(len(team_ids))}) AND d.state IN ('succeeded', 'failed')"
                " GROUP BY w.team_id, d.state",
                (self._dt_bind(since), *team_ids),
            )
            counts: dict[int, list[int]] = {}
            for team_id, state, n in cur.fetchall():
                counts.setdefault(team_id, [0, 0])[0 if state == "succeeded" else 1] += n
        return {t: (ok, bad) for t, (ok, bad) in counts.items()}

    def operations_snapshot(self, *, now: datetime, since: datetime, top: int) -> OperationsCounts:
        """The operator's figures in one statement (status, the admin overview and the /metrics
        gauges): open deliveries by state (the partial index ix_deliveries_open), the oldest due
        delivery that no dispatcher holds (the same index in due order, stopping at the first
        row), attempts started since `since` by outcome and the `top` webhooks with most failed
        attempts among them (ix_delivery_attempts_started), and the auto-disabled webhooks.

        The oldest due delivery leaves out rate-limited webhooks, whose backlog waits by the
        customer's choice, and deliveries under a live lease, which are being sent.

        Raises:
            StoreUnavailable.
        """
        m = self._mark
        dt = self._dt_bind
        # The first branch types the union's columns for PostgreSQL (an untyped NULL would be text).
        sql = (
            "SELECT * FROM (SELECT 'oldest' AS kind, CAST(NULL AS TEXT) AS k, CAST(0 AS BIGINT) AS n,"  # noqa: S608
            " d.next_attempt_at AS at, CAST(NULL AS BIGINT) AS extra FROM deliveries d JOIN webhooks w ON w.id = d.webhook_id"
            f" WHERE d.{OPEN_STATES_SQL} AND d.next_attempt_at <= {m}"
            f" AND (d.lease_expires_at IS NULL OR d.lease_expires_at < {m})"
            " AND w.active AND w.rate_limit IS NULL AND NOT d.is_test"
            " ORDER BY d.next_attempt_at LIMIT 1) oldest"
            " UNION ALL SELECT 'open', state, count(*), NULL, NULL FROM deliveries"
            f" WHERE {OPEN_STATES_SQL} GROUP BY state"
            " UNION ALL SELECT 'attempts', outcome, count(*), NULL, NULL FROM delivery_attempts"
            f" WHERE started_at >= {m} GROUP BY outcome"
            " UNION ALL SELECT 'failing', CAST(f.webhook_id AS TEXT), f.n, w.failing_since, w.team_id"
            " FROM (SELECT webhook_id, count(*) AS n FROM delivery_attempts"
            f" WHERE started_at >= {m} AND outcome <> '2xx' AND webhook_id IS NOT NULL"
            f" GROUP BY webhook_id ORDER BY n DESC, webhook_id LIMIT {m}) f"
            " JOIN webhooks w ON w.id = f.webhook_id"
            " UNION ALL SELECT 'off', NULL, count(*), NULL, NULL FROM webhooks"
            " WHERE disabled_reason = 'failing'"
        )
        stamp = dt(now)
        with self._driver(write=False) as cur:
            cur.execute(sql, (stamp, stamp, dt(since), dt(since), top))
            rows = cur.fetchall()
        read_dt = self._dt_result
        open_by_state: dict[str, int] = {}
        attempts: dict[str, int] = {}
        failing: list[tuple[int, int, int, datetime | None]] = []
        oldest = None
        off = 0
        for kind, key, n, at, extra in rows:
            if kind == "oldest":
                oldest = read_dt(at)
            elif kind == "open":
                open_by_state[key] = int(n)
            elif kind == "attempts":
                attempts[key or "unknown"] = int(n)
            elif kind == "failing":
                failing.append((int(key), int(extra), int(n), read_dt(at)))
            else:
                off = int(n)
        failing.sort(key=lambda f: (-f[2], f[0]))
        return OperationsCounts(
            open_by_state=open_by_state,
            oldest_due_at=oldest,
            attempts_by_outcome=attempts,
            top_failing=failing,
            switched_off=off,
        )

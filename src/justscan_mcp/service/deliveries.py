"""Delivery use cases: the log, statistics, test deliveries, redelivery and recovery."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import anyio

from justscan_mcp.errors import InvalidInput, NotFound
from justscan_mcp.events import TestData, envelope
from justscan_mcp.inputs import (
    DeliveryLogQuery,
    DeliveryRecoveryInput,
    DeliveryRef,
    WebhookRef,
    WebhookStatsQuery,
)
from justscan_mcp.models import (
    ATTEMPT_CLASSES,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    Caller,
    DeliveryPage,
    DeliveryPublic,
    HourlyOutcome,
    LatencyPercentiles,
    RecoveryResult,
    TestOutcome,
    WebhookStats,
)
from justscan_mcp.retry import DELIVERY_STATES
from justscan_mcp.service.base import UseCases, delivery_public, webhook_not_found
from justscan_mcp.service.validators import parse, positive_id
from justscan_mcp.threads import in_thread

FINAL_STATES = ("succeeded", "failed")
# How many deliveries one recover_deliveries call re-sends at most (SPEC).
RECOVERY_LIMIT = 10_000
# Waiting for a test delivery that a dispatcher in another process may take: how often to look.
POLL_INTERVAL = 0.02
# With a dispatcher in this process its save signals the outcome; the database is still read
# now and then, because another process's dispatcher may have taken the delivery.
SIGNALLED_POLL_INTERVAL = 0.5


def hour_start(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _hour(key: str) -> datetime:
    """The store's hour key 'YYYY-MM-DD HH' (UTC) as a time."""
    return datetime.strptime(key, "%Y-%m-%d %H").replace(tzinfo=UTC)


class DeliveryUseCases(UseCases):
    """A webhook's deliveries: reading the log, testing a receiver, sending an event again."""

    def get_webhook_stats(self, *, principal: Caller, webhook_id: int, hours: int = 24) -> WebhookStats:
        """How a webhook is doing over the last `hours` clock hours (the current one included):
        its deliveries created then, by state and per hour, their attempts by outcome class and
        duration, the success rate and the failure streak. Test deliveries count too: they are
        in the log beside the rest.

        Raises:
            InvalidInput (webhook_id, hours), NotFound.
        """
        given = parse(WebhookStatsQuery, {"webhook_id": webhook_id, "hours": hours})
        webhook = self._own_webhook(principal.team_id, given.webhook_id)
        first = hour_start(self.clock()) - timedelta(hours=given.hours - 1)
        counts = self.store.webhook_stats(webhook_id=given.webhook_id, since=first)
        by_state: dict[str, int] = dict.fromkeys(DELIVERY_STATES, 0)
        by_class: dict[str, int] = dict.fromkeys(ATTEMPT_CLASSES, 0)
        hourly = {
            first + timedelta(hours=i): HourlyOutcome(hour=first + timedelta(hours=i), succeeded=0, failed=0)
            for i in range(given.hours)
        }
        timing: dict[datetime, list[int]] = {}  # hour -> [attempts, their total ms]
        for state, hour, n in counts.deliveries:
            by_state[state] = by_state.get(state, 0) + n
            bucket = hourly.get(_hour(hour))
            if bucket is not None and state in ("succeeded", "failed"):
                setattr(bucket, state, getattr(bucket, state) + n)
        for outcome, hour, n, total_ms in counts.attempts:
            by_class[outcome] = by_class.get(outcome, 0) + n
            spent = timing.setdefault(_hour(hour), [0, 0])
            spent[0] += n
            spent[1] += total_ms
        for moment, (n, total_ms) in timing.items():
            if moment in hourly and n:
                hourly[moment].latency_ms = round(total_ms / n)
        finished = by_state["succeeded"] + by_state["failed"]
        return WebhookStats(
            webhook_id=given.webhook_id,
            hours=given.hours,
            since=first,
            deliveries=by_state,
            attempts=by_class,
            success_rate=round(by_state["succeeded"] / finished, 4) if finished else None,
            latency_ms=LatencyPercentiles(p50=counts.p50, p95=counts.p95),
            failing_since=webhook.failing_since,
            hourly=list(hourly.values()),
        )

    def send_test(self, *, principal: Caller, webhook_id: int) -> int:
        """Queue one signed `test` delivery to the webhook (whatever it subscribes to); one attempt.

        Raises:
            InvalidInput, NotFound.
        """
        given = parse(WebhookRef, {"webhook_id": webhook_id})
        webhook = self._own_webhook(principal.team_id, given.webhook_id)
        assert webhook.id is not None
        payload = envelope("test", TestData(test=True, webhook_id=webhook.id), self.clock())
        delivery_id = self.store.record_test_delivery(webhook=webhook, payload=payload, now=self.clock())
        self.on_recorded()
        return delivery_id

    def test_outcome(self, *, principal: Caller, delivery_id: int) -> TestOutcome:
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

    async def test_webhook(self, *, principal: Caller, webhook_id: int) -> TestOutcome:
        """Queue a test delivery and wait (up to the delivery timeout + 5 s) for its outcome.

        A dispatcher in this process signals the save (no polling); for one elsewhere the
        database is read every 20 ms.

        Raises:
            as send_test.
        """
        delivery_id = await in_thread(partial(self.send_test, principal=principal, webhook_id=webhook_id))
        deadline = time.monotonic() + self.settings.delivery_timeout + 5
        signals = self.test_signals
        saved = signals.watch(delivery_id)
        try:
            while True:
                outcome = await in_thread(
                    partial(self.test_outcome, principal=principal, delivery_id=delivery_id)
                )
                left = deadline - time.monotonic()
                if outcome.state in FINAL_STATES or left <= 0:
                    return outcome
                interval = SIGNALLED_POLL_INTERVAL if signals.local_dispatcher else POLL_INTERVAL
                with anyio.move_on_after(min(interval, left)):
                    await saved.wait()
        finally:
            signals.forget(delivery_id)

    def list_deliveries(
        self,
        *,
        principal: Caller,
        webhook_id: int,
        cursor: str | None = None,
        limit: int = LIST_LIMIT_DEFAULT,
        state: str | None = None,
        event: str | None = None,
    ) -> DeliveryPage:
        """One page of a webhook's delivery log, newest first, each with its attempts; `state`
        and `event` narrow it.

        Raises:
            InvalidInput (webhook_id, limit, cursor, state, event), NotFound.
        """
        given = parse(
            DeliveryLogQuery,
            {"webhook_id": webhook_id, "cursor": cursor, "limit": limit, "state": state, "event": event},
        )
        webhook = self._own_webhook(principal.team_id, given.webhook_id)
        assert webhook.id is not None
        return self._delivery_page(team_id=principal.team_id, query=given)

    def delivery_log(
        self, *, webhook_id: int, limit: int = LIST_LIMIT_MAX, state: str | None = None
    ) -> DeliveryPage:
        """Operator view of a webhook's log (the CLI): no key, any team.

        Raises:
            InvalidInput, NotFound.
        """
        wid = positive_id("webhook_id", webhook_id)
        given = parse(DeliveryLogQuery, {"webhook_id": wid, "limit": limit, "state": state})
        webhook = self.store.get_webhook_by_id(wid)
        if webhook is None:
            raise NotFound("webhook_id", f"webhook {wid} does not exist")
        return self._delivery_page(team_id=webhook.team_id, query=given)

    def _delivery_page(self, *, team_id: int, query: DeliveryLogQuery) -> DeliveryPage:
        now = self.clock()
        before = None
        state, event, webhook_id, limit = query.state, query.event, query.webhook_id, query.limit
        # A cursor is bound to its filters too: one from another filter would skip rows.
        kind = f"deliveries:{webhook_id}" + (f":{state or ''}:{event or ''}" if state or event else "")
        if query.cursor is not None:
            if not query.cursor:
                raise InvalidInput("cursor", "must be next_cursor from a previous page, or omitted")
            before = self.cursors.decode(query.cursor, kind=kind, team_id=team_id, now=now)
        rows = self.store.list_deliveries(
            webhook_id=webhook_id, before_id=before, limit=limit + 1, state=state, event=event
        )
        page = rows[:limit]
        next_cursor = None
        if len(rows) > limit:
            last = page[-1][0].id
            assert last is not None
            next_cursor = self.cursors.encode(kind=kind, team_id=team_id, after_id=last, now=now)
        return DeliveryPage(deliveries=[delivery_public(d, a) for d, a in page], next_cursor=next_cursor)

    def redeliver(self, *, principal: Caller, delivery_id: Any) -> DeliveryPublic:
        """Queue a new delivery of a past delivery's event to its webhook, linked to the original
        (`redelivery_of`). It is a normal delivery: signed anew, retried on the schedule.

        Raises:
            InvalidInput (delivery_id), NotFound, Conflict (the webhook is inactive).
        """
        did = parse(DeliveryRef, {"delivery_id": delivery_id}).delivery_id
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
        return delivery_public(copy, [])

    def recover_deliveries(
        self,
        *,
        principal: Caller,
        webhook_id: int,
        since: Any,
        until: Any = None,
        dry_run: bool = False,
    ) -> RecoveryResult:
        """Re-send every `failed` delivery of the webhook created in [since, until) whose event
        has not since been delivered to it (nor is on its way): after an outage, one call. Each
        re-send is a new delivery linked by `redelivery_of`. At most `RECOVERY_LIMIT` per call;
        `more` says to call again with the same arguments, which continues where this one ended.

        Raises:
            InvalidInput (webhook_id, since, until, dry_run), NotFound, Conflict (active: the
            webhook is inactive).
        """
        given = parse(
            DeliveryRecoveryInput,
            {"webhook_id": webhook_id, "since": since, "until": until, "dry_run": dry_run},
        )
        if given.until is not None and given.until <= given.since:
            raise InvalidInput("until", "must be later than since")
        found = self.store.recover(
            team_id=principal.team_id,
            webhook_id=given.webhook_id,
            since=given.since,
            until=given.until,
            limit=RECOVERY_LIMIT,
            dry_run=given.dry_run,
            now=self.clock(),
        )
        if found is None:
            raise webhook_not_found(given.webhook_id)
        ids, more = found
        if ids and not given.dry_run:
            self.on_recorded()
        return RecoveryResult(count=len(ids), deliveries=ids, more=more, dry_run=given.dry_run)

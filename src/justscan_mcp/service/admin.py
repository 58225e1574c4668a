"""Read models for people: the dashboard's webhook list and the operator's cross-team views."""

from __future__ import annotations

from datetime import timedelta

from justscan_mcp.models import (
    ATTEMPT_CLASSES,
    OPEN_STATES,
    AdminKeys,
    AdminOverview,
    ApiKeyPublic,
    DispatcherBeat,
    DispatcherPublic,
    FailingDelivery,
    FailingWebhook,
    OperationsStatus,
    TeamPublic,
    WebhookPublic,
    WebhookSummary,
)
from justscan_mcp.service.base import UseCases, delivery_public, summary
from justscan_mcp.service.validators import positive_id

ADMIN_PAGE = 100
SUCCESS_WINDOW = timedelta(hours=24)  # the admin area's success rates
STATUS_WINDOW = timedelta(minutes=5)  # `status`: attempts and failing webhooks of the last 5 minutes
STATUS_TOP = 10  # how many failing webhooks `status` and /metrics name


class AdminQueries(UseCases):
    """Pages that combine several reads; each runs a fixed number of queries, whatever its size."""

    def with_last_delivery(self, webhooks: list[WebhookPublic]) -> list[WebhookSummary]:
        """Webhooks the caller may already see (a page of list_webhooks), each with its newest
        delivery: the dashboard's list."""
        last = self.store.last_deliveries([w.id for w in webhooks])
        return [summary(w, last.get(w.id)) for w in webhooks]

    def admin_overview(
        self, *, limit: int = ADMIN_PAGE, webhooks_after: int = 0, failing_before: int | None = None
    ) -> AdminOverview:
        """One page of the operator's view across teams: webhooks with their last outcome, and
        the newest failed or retrying deliveries, each list paged on its own, and each listed
        team's success rate over 24 hours. A fixed number of queries (eight), whatever the page
        size.

        Raises:
            InvalidInput: a malformed page position.
        """
        webhooks_after = 0 if webhooks_after == 0 else positive_id("webhooks_after", webhooks_after)
        if failing_before is not None:
            failing_before = positive_id("failing_before", failing_before)
        rows = self.store.all_webhooks(after_id=webhooks_after, limit=limit + 1)
        hooks = [WebhookPublic.model_validate(w) for w in rows[:limit]]
        failing_rows = self.store.failing_deliveries(before_id=failing_before, limit=limit + 1)
        failing = [
            FailingDelivery(
                **delivery_public(d, [attempt] if attempt else []).model_dump(), team_id=d.team_id, url=url
            )
            for d, attempt, url in failing_rows[:limit]
        ]
        switched_off = [WebhookPublic.model_validate(w) for w in self.store.switched_off(limit=limit)]
        named = {w.team_id for w in hooks} | {f.team_id for f in failing} | {w.team_id for w in switched_off}
        teams = self.store.teams_by_id(sorted(named))
        finished = self.store.finished_by_team(team_ids=sorted(teams), since=self.clock() - SUCCESS_WINDOW)
        return AdminOverview(
            teams=[TeamPublic.model_validate(t) for _, t in sorted(teams.items())],
            success_rates={
                t: round(ok / (ok + bad), 4) if ok + bad else None
                for t in teams
                for ok, bad in [finished.get(t, (0, 0))]
            },
            switched_off=switched_off,
            webhooks=self.with_last_delivery(hooks),
            failing=failing,
            next_webhooks=hooks[-1].id if len(rows) > limit else None,
            next_failing=failing[-1].id if len(failing_rows) > limit else None,
        )

    def admin_keys(self, *, teams_after: int = 0, limit: int = ADMIN_PAGE) -> AdminKeys:
        """One page of teams with their API keys (the operator's key page): two queries.

        Raises:
            InvalidInput: a malformed page position.
        """
        teams_after = 0 if teams_after == 0 else positive_id("teams_after", teams_after)
        rows = self.store.list_teams(after_id=teams_after, limit=limit + 1)
        teams = [TeamPublic.model_validate(t) for t in rows[:limit]]
        keys = self.store.api_keys_of([t.id for t in teams])
        return AdminKeys(
            teams=teams,
            keys={tid: [ApiKeyPublic.model_validate(k) for k in ks] for tid, ks in keys.items()},
            next_teams=teams[-1].id if len(rows) > limit else None,
        )

    def live_dispatchers(self) -> list[DispatcherBeat]:
        """Dispatchers whose last heartbeat is younger than three of their beat intervals."""
        now = self.clock()
        return [
            b
            for b in self.store.dispatcher_beats()
            if now - b.last_beat_at <= timedelta(seconds=3 * b.interval_seconds)
        ]

    def operations_status(self, *, top: int = STATUS_TOP) -> OperationsStatus:
        """The operator's first look, across every team, in two statements whatever the size of
        the database: live dispatchers, open deliveries by state, the oldest due delivery no
        dispatcher holds, the last five minutes of attempts by outcome, and the webhooks with
        most failed attempts in them. `justscan-mcp status`, the admin area and the /metrics
        gauges all read this.

        Raises:
            StoreUnavailable.
        """
        now = self.clock()
        counts = self.store.operations_snapshot(now=now, since=now - STATUS_WINDOW, top=top)
        attempts = {c: counts.attempts_by_outcome.get(c, 0) for c in ATTEMPT_CLASSES}
        total = sum(counts.attempts_by_outcome.values())
        oldest = counts.oldest_due_at
        return OperationsStatus(
            generated_at=now,
            window_seconds=int(STATUS_WINDOW.total_seconds()),
            dispatchers=[DispatcherPublic.model_validate(b) for b in self.live_dispatchers()],
            open_deliveries={s: counts.open_by_state.get(s, 0) for s in OPEN_STATES},
            oldest_due_at=oldest,
            oldest_due_age_seconds=max(0.0, (now - oldest).total_seconds()) if oldest else None,
            attempts=attempts,
            success_rate=round(attempts["2xx"] / total, 4) if total else None,
            top_failing=[
                FailingWebhook(webhook_id=w, team_id=t, failed_attempts=n, failing_since=since)
                for w, t, n, since in counts.top_failing
            ],
            switched_off=counts.switched_off,
        )

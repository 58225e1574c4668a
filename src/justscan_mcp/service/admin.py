"""Read models for people: the dashboard's webhook list and the operator's cross-team views."""

from __future__ import annotations

from datetime import timedelta

from justscan_mcp.models import (
    AdminKeys,
    AdminOverview,
    ApiKeyPublic,
    FailingDelivery,
    TeamPublic,
    WebhookPublic,
    WebhookSummary,
)
from justscan_mcp.service.base import UseCases, delivery_public, summary
from justscan_mcp.service.validators import positive_id

ADMIN_PAGE = 100
SUCCESS_WINDOW = timedelta(hours=24)  # the admin area's success rates


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

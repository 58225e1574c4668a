"""The use cases of justscan-mcp: every rule of SPEC once, for every front end.

Split by use case, each module small:

- `validators`: every check of a caller's value (field rules live in `justscan_mcp.inputs`);
- `access`: teams, API keys, who a key is, dashboard sessions;
- `webhooks`: create, read, list, change, rotate, delete;
- `events`: record an event and fan it out;
- `deliveries`: the log, test deliveries and waiting for them, redelivery;
- `admin`: pages that combine reads (the dashboard's list, the operator's views);
- `operations`: the operation table and `invoke`, the one scope gate of the front ends.

`Service` combines the use-case classes into the one handle front ends and the CLI get. Nothing
here knows a transport. Methods are keyword-only; synchronous ones run in a worker thread when
called from async code (`justscan_mcp.threads.in_thread`).
"""

from __future__ import annotations

from datetime import timedelta

from justscan_mcp.inputs import DEFAULT_ROTATION_GRACE, MAX_ROTATION_GRACE
from justscan_mcp.models import Caller, RecoveryResult
from justscan_mcp.service.access import DASHBOARD_SESSION_TTL, AccessUseCases
from justscan_mcp.service.admin import AdminQueries
from justscan_mcp.service.confirmations import ConfirmationUseCases
from justscan_mcp.service.deliveries import DeliveryUseCases
from justscan_mcp.service.events import EventUseCases
from justscan_mcp.service.oauth import OAuthUseCases
from justscan_mcp.service.operations import EVENTS_WRITE, READ, WRITE
from justscan_mcp.service.webhooks import WebhookUseCases


class Service(
    AccessUseCases,
    AdminQueries,
    WebhookUseCases,
    EventUseCases,
    DeliveryUseCases,
    OAuthUseCases,
    ConfirmationUseCases,
):
    """Every use case, over one `Store` (the constructor is `UseCases.__init__`)."""

    def enable_and_recover(self, *, principal: Caller, webhook_id: int) -> RecoveryResult:
        """Switch a webhook back on and re-send what failed in its streak: the dashboard's answer
        to an automatic switch-off. The window starts early enough to hold every delivery that
        failed since `failing_since` (the longest a delivery can take to fail before it).

        Raises:
            InvalidInput, NotFound (webhook_id).
        """
        hook = self.get_webhook(principal=principal, webhook_id=webhook_id)
        settings = self.settings
        lifetime = sum(settings.retry_schedule) + (len(settings.retry_schedule) + 1) * settings.lease_seconds
        since = (hook.failing_since or hook.updated_at) - timedelta(seconds=lifetime)
        if not hook.active:
            self.update_webhook(principal=principal, webhook_id=hook.id, changes={"active": True})
        return self.recover_deliveries(principal=principal, webhook_id=hook.id, since=since)


__all__ = [
    "DASHBOARD_SESSION_TTL",
    "DEFAULT_ROTATION_GRACE",
    "EVENTS_WRITE",
    "MAX_ROTATION_GRACE",
    "READ",
    "WRITE",
    "Service",
]

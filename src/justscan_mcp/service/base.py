"""What every use case shares: its dependencies, and the lookups that keep a team in its own rows.

The store, settings, clock, resolver and cursor codec live on `UseCases`; the conversions from
rows to public shapes are here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import anyio

from justscan_mcp.config import Settings
from justscan_mcp.errors import NotFound
from justscan_mcp.models import (
    OPEN_STATES,
    AttemptPublic,
    Delivery,
    DeliveryAttempt,
    DeliveryPublic,
    Webhook,
    WebhookPublic,
    WebhookSummary,
    utcnow,
)
from justscan_mcp.security import CursorCodec
from justscan_mcp.service.validators import positive_id
from justscan_mcp.store import Store
from justscan_mcp.targets import Resolver, system_resolver


class TestSignals:
    """Events keyed by delivery id, set when this process's dispatcher saved a test delivery's
    attempt. Used on the event loop only (the dispatcher calls `saved` from its writer task)."""

    def __init__(self) -> None:
        self._events: dict[int, anyio.Event] = {}
        self.local_dispatcher = False

    def watch(self, delivery_id: int) -> anyio.Event:
        return self._events.setdefault(delivery_id, anyio.Event())

    def forget(self, delivery_id: int) -> None:
        self._events.pop(delivery_id, None)

    def saved(self, delivery_ids: Iterable[int]) -> None:
        for delivery_id in delivery_ids:
            event = self._events.get(delivery_id)
            if event is not None:
                event.set()


class UseCases:
    """The state and helpers of the use-case classes (`Service` combines them). Only this class
    holds state; the use-case classes add methods, and reach each other only through `Service`."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        resolver: Resolver = system_resolver,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.settings = settings
        self.resolver = resolver
        self.clock = clock
        self._cursors: CursorCodec | None = None
        self._operator_fp: str | None = None
        # Set by the app to the local dispatcher's wake(): a recorded event is sent at once.
        self.on_recorded: Callable[[], None] = lambda: None
        # Told by the local dispatcher when a test delivery's attempt is saved (its caller waits).
        self.test_signals = TestSignals()

    @property
    def cursors(self) -> CursorCodec:
        if self._cursors is None:
            self._cursors = CursorCodec(self.store.instance_secret("cursor_key").encode())
        return self._cursors

    def _require_team(self, team_id: Any) -> int:
        tid = positive_id("team", team_id)
        if self.store.get_team(tid) is None:
            raise NotFound("team", f"team {tid} does not exist; create it with `justscan-mcp team create`")
        return tid

    def _own_webhook(self, team_id: int, webhook_id: Any) -> Webhook:
        webhook_id = positive_id("webhook_id", webhook_id)
        webhook = self.store.get_webhook(team_id=team_id, webhook_id=webhook_id)
        if webhook is None:
            raise webhook_not_found(webhook_id)
        return webhook


def webhook_not_found(webhook_id: int) -> NotFound:
    # The same words for a missing id and another team's id: existence must not leak.
    return NotFound(
        "webhook_id",
        f"webhook {webhook_id} does not exist in this team; list_webhooks shows the valid ids",
    )


def delivery_public(d: Delivery, attempts: list[DeliveryAttempt]) -> DeliveryPublic:
    return DeliveryPublic(
        id=d.id or 0,
        webhook_id=d.webhook_id,
        event_id=d.event_id,
        event=d.event,
        state=d.state,
        is_test=d.is_test,
        redelivery_of=d.redelivery_of,
        note=d.note,
        created_at=d.created_at,
        next_attempt_at=d.next_attempt_at if d.state in OPEN_STATES else None,
        attempts=[AttemptPublic.model_validate(a) for a in attempts],
    )


def summary(w: WebhookPublic, last: tuple[Delivery, DeliveryAttempt | None] | None) -> WebhookSummary:
    delivery = delivery_public(last[0], [last[1]] if last[1] else []) if last else None
    return WebhookSummary(**w.model_dump(), last_delivery=delivery)

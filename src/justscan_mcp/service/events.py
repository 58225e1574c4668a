"""Event use cases: record an event and fan it out to the team's subscribed webhooks."""

from __future__ import annotations

from typing import Any

from justscan_mcp.events import envelope, validate_emit
from justscan_mcp.models import Caller, EmitResult
from justscan_mcp.service.base import UseCases


class EventUseCases(UseCases):
    """Recording events (the outbox does the fan-out in one transaction)."""

    def emit_event(self, *, team_id: Any, event: Any, data: Any) -> EmitResult:
        """Record an event for a team and fan it out to its subscribed, active webhooks.

        The first `scan` of a QR code in a team also produces a `first_scan`; its deliveries are
        in the result too.

        Raises:
            InvalidInput: (event, data, data.<field>) for an unknown or internal event name, data
                that is not an object, or a missing, mistyped or unknown field.
            NotFound: (team) for a team that does not exist.
        """
        model = validate_emit(event, data)
        tid = self._require_team(team_id)
        now = self.clock()
        first = None
        if event == "scan":
            first = (int(model.qr_code_id), envelope("first_scan", model, now))  # type: ignore[attr-defined]
        event_id, deliveries = self.store.record_event(
            team_id=tid, event=event, payload=envelope(event, model, now), now=now, first_scan=first
        )
        if deliveries:
            self.on_recorded()
        return EmitResult(event_id=event_id, deliveries=deliveries)

    def emit_event_as(self, *, principal: Caller, event: Any, data: Any) -> EmitResult:
        """`emit_event` for the caller's own team. Raises: as emit_event."""
        return self.emit_event(team_id=principal.team_id, event=event, data=data)

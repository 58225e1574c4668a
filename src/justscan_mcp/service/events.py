"""Event use cases: record an event and fan it out to the team's subscribed webhooks."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from justscan_mcp.errors import InvalidInput
from justscan_mcp.events import envelope, validate_emit
from justscan_mcp.models import IDEMPOTENCY_KEY_MAX, Caller, EmitResult
from justscan_mcp.service.base import UseCases

# How long an Idempotency-Key is remembered (SPEC: 24 hours).
IDEMPOTENCY_TTL = timedelta(hours=24)


class EventUseCases(UseCases):
    """Recording events (the outbox does the fan-out in one transaction)."""

    def emit_event(
        self, *, team_id: Any, event: Any, data: Any, idempotency_key: str | None = None
    ) -> EmitResult:
        """Record an event for a team and fan it out to its subscribed, active webhooks.

        The first `scan` of a QR code in a team also produces a `first_scan`; its deliveries are
        in the result too.

        Raises:
            InvalidInput: (event, data, data.<field>) for an unknown or internal event name, data
                that is not an object, or a missing, mistyped or unknown field.
            NotFound: (team) for a team that does not exist.
            Conflict: (Idempotency-Key) the key was used within 24 hours with another request.

        With `idempotency_key`, a repeat of the same request within 24 hours answers the first
        answer again (`replayed`) and records nothing.
        """
        if idempotency_key is not None and not 1 <= len(str(idempotency_key)) <= IDEMPOTENCY_KEY_MAX:
            raise InvalidInput("Idempotency-Key", f"must be 1 to {IDEMPOTENCY_KEY_MAX} characters long")
        model = validate_emit(event, data)
        tid = self._require_team(team_id)
        now = self.clock()
        first = None
        if event == "scan":
            first = (int(model.qr_code_id), envelope("first_scan", model, now))  # type: ignore[attr-defined]
        payload = envelope(event, model, now)
        if idempotency_key is None:
            event_id, deliveries = self.store.record_event(
                team_id=tid, event=event, payload=payload, now=now, first_scan=first
            )
            result = EmitResult(event_id=event_id, deliveries=deliveries)
        else:
            request = json.dumps({"event": event, "data": data}, sort_keys=True, ensure_ascii=False)
            answer, replayed = self.store.record_event_once(
                team_id=tid,
                key=idempotency_key,
                request_hash=hashlib.sha256(request.encode()).hexdigest(),
                answer=lambda event_id, ids: EmitResult(event_id=event_id, deliveries=ids).model_dump_json(),
                expires_at=now + IDEMPOTENCY_TTL,
                event=event,
                payload=payload,
                now=now,
                first_scan=first,
            )
            result = EmitResult.model_validate_json(answer).model_copy(update={"replayed": replayed})
        if result.deliveries and not result.replayed:
            self.on_recorded()
        return result

    def emit_event_as(
        self, *, principal: Caller, event: Any, data: Any, idempotency_key: str | None = None
    ) -> EmitResult:
        """`emit_event` for the caller's own team. Raises: as emit_event."""
        return self.emit_event(
            team_id=principal.team_id, event=event, data=data, idempotency_key=idempotency_key
        )

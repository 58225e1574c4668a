"""Event use cases: record events and fan them out to the team's subscribed webhooks.

Three ways in, one way to the database (`Store.record_events`, one transaction for many events):
- `emit_event`: one event (the CLI, and REST with an Idempotency-Key);
- `emit_events_as`: a batch of up to 1,000 from one caller (`POST /events/batch`), each event
  checked on its own, the valid ones recorded even when others are refused;
- `ingest`: single events of many concurrent callers, which the HTTP server's group commit
  hands over together (`POST /events` without an Idempotency-Key), keys checked here too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from justscan_mcp.errors import (
    Conflict,
    InvalidInput,
    JustScanError,
    MissingScope,
    Unauthenticated,
    http_status,
    public_message,
)
from justscan_mcp.events import envelope, validate_emit
from justscan_mcp.models import (
    BATCH_MAX,
    IDEMPOTENCY_KEY_MAX,
    BatchEmitResult,
    BatchItemResult,
    Caller,
    EmitResult,
)
from justscan_mcp.security import hash_api_key, looks_like_api_key
from justscan_mcp.service.base import UseCases
from justscan_mcp.store import LAST_USED_RESOLUTION, KeyRow, NewEvent

# How long an Idempotency-Key is remembered (SPEC: 24 hours).
IDEMPOTENCY_TTL = timedelta(hours=24)
EVENTS_WRITE = "events:write"


@dataclass(frozen=True)
class IngestRequest:
    """One `POST /events` as the group commit hands it over: the bearer key as sent, and the
    body's event and data (unchecked)."""

    raw_key: str | None
    event: Any
    data: Any


def _prepare(team_id: int, event: Any, data: Any, now: datetime) -> NewEvent:
    """Check one event and build what is stored: its envelope and, for a scan, the first_scan's.

    Raises:
        InvalidInput: as validate_emit.
    """
    return _stored(team_id, event, validate_emit(event, data), now)


def _stored(team_id: int, event: str, model: Any, now: datetime) -> NewEvent:
    """What is stored for a checked event (`model` from validate_emit)."""
    first = None
    if event == "scan":
        first = (int(model.qr_code_id), partial(envelope, "first_scan", model, now))
    return NewEvent(team_id=team_id, event=event, payload=envelope(event, model, now), first_scan=first)


def _check_idempotency_key(key: str | None) -> None:
    if key is not None and not 1 <= len(str(key)) <= IDEMPOTENCY_KEY_MAX:
        raise InvalidInput("Idempotency-Key", f"must be 1 to {IDEMPOTENCY_KEY_MAX} characters long")


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
        _check_idempotency_key(idempotency_key)
        now = self.clock()
        model = validate_emit(event, data)  # the data first, then the team, as before
        tid = self._require_team(team_id)
        item = _stored(tid, event, model, now)
        if idempotency_key is None:
            event_id, deliveries = self.store.record_events(items=[item], now=now)[0]
            result = EmitResult(event_id=event_id, deliveries=deliveries)
        else:
            request = json.dumps({"event": event, "data": data}, sort_keys=True, ensure_ascii=False)
            answer, replayed = self.store.record_events_once(
                team_id=tid,
                key=idempotency_key,
                request_hash=hashlib.sha256(request.encode()).hexdigest(),
                answer=lambda results: EmitResult(
                    event_id=results[0][0], deliveries=results[0][1]
                ).model_dump_json(),
                expires_at=now + IDEMPOTENCY_TTL,
                items=[item],
                now=now,
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

    def emit_events_as(
        self, *, principal: Caller, events: Any, idempotency_key: str | None = None
    ) -> BatchEmitResult:
        """Record up to 1,000 events for the caller's team. Each is checked on its own: a refused
        one is reported in its place (`error`, `message`, `field` as `events[i].<field>`) and the
        others are recorded; each event is atomic with its deliveries. With an Idempotency-Key
        the whole request is replayed or refused as one.

        Raises:
            InvalidInput: (events) not a list of 1 to 1,000 objects; (Idempotency-Key) too long.
            Conflict: (Idempotency-Key) the key was used within 24 hours with another request.
        """
        _check_idempotency_key(idempotency_key)
        if not isinstance(events, list) or not 1 <= len(events) <= BATCH_MAX:
            raise InvalidInput("events", f"must be a list of 1 to {BATCH_MAX} events")
        now = self.clock()
        team_id = principal.team_id
        outcomes: list[NewEvent | JustScanError] = []
        for n, raw in enumerate(events):
            try:
                if not isinstance(raw, dict):
                    raise InvalidInput("", "must be an object with event and data")
                extra = sorted(set(raw) - {"event", "data"})
                if extra:
                    raise InvalidInput(extra[0], "is not a field of an event")
                outcomes.append(_prepare(team_id, raw.get("event"), raw.get("data"), now))
            except InvalidInput as exc:
                field = f"events[{n}]" + (f".{exc.field}" if exc.field else "")
                outcomes.append(InvalidInput(field, exc.reason))
        valid = [o for o in outcomes if isinstance(o, NewEvent)]
        if idempotency_key is None:
            result = _answer(outcomes, self._record(valid, now))
            if result.recorded:
                self.on_recorded()
            return result
        request = json.dumps(events, sort_keys=True, ensure_ascii=False)
        text, replayed = self.store.record_events_once(
            team_id=team_id,
            key=idempotency_key,
            request_hash=hashlib.sha256(request.encode()).hexdigest(),
            answer=lambda rows: _answer(outcomes, rows).model_dump_json(),
            expires_at=now + IDEMPOTENCY_TTL,
            items=valid,
            now=now,
        )
        result = BatchEmitResult.model_validate_json(text).model_copy(update={"replayed": replayed})
        if result.recorded and not replayed:
            self.on_recorded()
        return result

    def ingest(self, requests: Sequence[IngestRequest]) -> list[EmitResult | JustScanError]:
        """Single events of many callers, recorded together in one transaction (the group
        commit of `POST /events`). Each request is checked as the route checks it (its key:
        unknown or revoked is Unauthenticated, no events:write is MissingScope; then its event),
        with every key read in the same transaction that records the events. Returns, per
        request in order, its result or the error to answer it with; a refused request records
        nothing.

        Raises:
            StoreUnavailable: the database cannot be reached (every request fails alike).
        """
        now = self.clock()
        hashes: dict[str, str] = {}
        # (key hash, event, its checked data or why it was refused), or why the key was refused
        checked: list[tuple[str, str, Any] | JustScanError] = []
        for req in requests:
            raw = req.raw_key
            if not raw:
                checked.append(Unauthenticated("no API key given; send Authorization: Bearer jsi_..."))
                continue
            if not looks_like_api_key(raw):
                checked.append(Unauthenticated("that is not a justscan API key (they start with jsi_)"))
                continue
            key_hash = hashes.setdefault(raw, hash_api_key(raw))
            try:
                checked.append((key_hash, req.event, validate_emit(req.event, req.data)))
            except InvalidInput as exc:
                checked.append((key_hash, req.event, exc))
        outcomes: list[NewEvent | JustScanError] = []
        seen: Mapping[str, KeyRow] = {}

        def build(keys: Mapping[str, KeyRow]) -> list[NewEvent]:
            nonlocal seen
            seen = keys
            outcomes.clear()
            for c in checked:
                if isinstance(c, JustScanError):
                    outcomes.append(c)
                    continue
                key_hash, event, model = c
                key = keys.get(key_hash)
                if key is None or key.revoked:
                    outcomes.append(
                        Unauthenticated(
                            "unknown API key" if key is None else f"API key {key.prefix}... was revoked"
                        )
                    )
                elif EVENTS_WRITE not in key.scopes:
                    outcomes.append(MissingScope(EVENTS_WRITE, "emit_event"))
                elif isinstance(model, JustScanError):
                    outcomes.append(model)  # the key first, then the body, as the route answers
                else:
                    outcomes.append(_stored(key.team_id, event, model, now))
            return [o for o in outcomes if isinstance(o, NewEvent)]

        stored: list[tuple[int, list[int]] | JustScanError]
        try:
            stored = list(
                self.store.record_events_by_keys(
                    key_hashes=sorted(set(hashes.values())), build=build, most=len(requests), now=now
                )
            )
        except (Conflict, InvalidInput):
            # A row the database refused: each event in a transaction of its own.
            stored = self._record_each([o for o in outcomes if isinstance(o, NewEvent)], now)
        rows_iter = iter(stored)
        results: list[EmitResult | JustScanError] = []
        for o in outcomes:
            got = next(rows_iter) if isinstance(o, NewEvent) else o
            results.append(
                got if isinstance(got, JustScanError) else EmitResult(event_id=got[0], deliveries=got[1])
            )
        # last_used_at is informative (one-minute resolution): written apart, once a minute a key.
        for key in seen.values():
            if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
                self.store.touch_api_key(key.id, now=now)
        if any(isinstance(r, EmitResult) and r.deliveries for r in results):
            self.on_recorded()
        return results

    def _record(self, items: list[NewEvent], now: datetime) -> list[tuple[int, list[int]] | JustScanError]:
        """All items in one transaction; when the database refuses a row (a webhook deleted
        under the batch, an odd value), each item in a transaction of its own, so only the
        refused one fails.

        Raises:
            StoreUnavailable.
        """
        if not items:
            return []
        try:
            return list(self.store.record_events(items=items, now=now))
        except (Conflict, InvalidInput):
            return self._record_each(items, now)

    def _record_each(
        self, items: list[NewEvent], now: datetime
    ) -> list[tuple[int, list[int]] | JustScanError]:
        """Each item in a transaction of its own; a refused one is its error. Raises: StoreUnavailable."""
        out: list[tuple[int, list[int]] | JustScanError] = []
        for item in items:
            try:
                out.append(self.store.record_events(items=[item], now=now)[0])
            except (Conflict, InvalidInput) as exc:
                out.append(exc)
        return out


def _refused(n: int, exc: JustScanError) -> BatchItemResult:
    _, code = http_status(exc)
    return BatchItemResult(
        index=n, error=code, message=public_message(exc), field=getattr(exc, "field", None)
    )


def _answer(
    outcomes: Sequence[NewEvent | JustScanError], rows: Sequence[tuple[int, list[int]] | JustScanError]
) -> BatchEmitResult:
    """The batch's answer: `rows` are the stored results of the valid events, in order."""
    stored = iter(rows)
    items = []
    for n, o in enumerate(outcomes):
        got = next(stored) if isinstance(o, NewEvent) else o
        if isinstance(got, JustScanError):
            items.append(_refused(n, got))
        else:
            items.append(BatchItemResult(index=n, event_id=got[0], deliveries=got[1]))
    ok = sum(1 for i in items if i.error is None)
    return BatchEmitResult(recorded=ok, failed=len(items) - ok, results=items)

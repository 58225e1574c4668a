"""`POST /api/v1/events` with `Idempotency-Key`: a repeat answers the first answer and records
nothing; another request with the key is 409; concurrent repeats record one event. Both databases."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func
from sqlmodel import select

from justscan_mcp.errors import Conflict
from justscan_mcp.models import Event
from justscan_mcp.rest_api import build_rest_api
from justscan_mcp.service import Service
from tests.conftest import PUBLIC_URL, TeamKit

SCAN = {"qr_code_id": 41, "scan_id": 7}


def events_of(kit: TeamKit) -> int:
    with kit.app.store.session() as s:
        return s.exec(select(func.count()).select_from(Event).where(Event.team_id == kit.team.id)).one()


def test_a_repeat_answers_the_first_answer_and_records_nothing(kit: TeamKit):
    kit.app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"])
    svc = kit.app.service
    first = svc.emit_event(team_id=kit.team.id, event="scan", data=SCAN, idempotency_key="order-1")
    again = svc.emit_event(team_id=kit.team.id, event="scan", data=dict(SCAN), idempotency_key="order-1")
    assert (first.replayed, again.replayed) == (False, True)
    assert again.model_dump() == first.model_dump()
    assert events_of(kit) == 2  # one scan and its first_scan, neither recorded twice
    assert len(first.deliveries) == 1  # the webhook takes scans only
    other = svc.emit_event(team_id=kit.team.id, event="scan", data=SCAN, idempotency_key="order-2")
    assert other.event_id != first.event_id and not other.replayed


def test_the_same_key_with_another_request_is_refused_and_stores_nothing(kit: TeamKit):
    svc = kit.app.service
    svc.emit_event(team_id=kit.team.id, event="scan", data=SCAN, idempotency_key="k")
    with pytest.raises(Conflict) as err:
        svc.emit_event(team_id=kit.team.id, event="scan", data={**SCAN, "scan_id": 8}, idempotency_key="k")
    assert err.value.field == "Idempotency-Key"
    assert events_of(kit) == 2  # the first scan and its first_scan


def test_keys_are_per_team_and_expire_after_24_hours(kit: TeamKit, other: TeamKit):
    svc = kit.app.service
    mine = svc.emit_event(team_id=kit.team.id, event="scan", data=SCAN, idempotency_key="shared")
    theirs = svc.emit_event(team_id=other.team.id, event="scan", data=SCAN, idempotency_key="shared")
    assert not theirs.replayed and theirs.event_id != mine.event_id
    later = Service(
        svc.store, svc.settings, resolver=svc.resolver, clock=lambda: svc.clock() + timedelta(hours=25)
    )
    fresh = later.emit_event(
        team_id=kit.team.id, event="scan", data={**SCAN, "scan_id": 9}, idempotency_key="shared"
    )
    assert not fresh.replayed and fresh.event_id != mine.event_id


@pytest.mark.anyio
async def test_twenty_concurrent_posts_with_one_key_record_one_event(kit: TeamKit):
    kit.app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"])
    key = kit.key(scopes=["events:write"])
    transport = httpx.ASGITransport(app=build_rest_api(kit.app))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as rest:
        headers = {"Authorization": f"Bearer {key.key}", "Idempotency-Key": "campaign-42"}
        answers = await asyncio.gather(
            *(rest.post("/events", json={"event": "scan", "data": SCAN}, headers=headers) for _ in range(20))
        )
        assert {r.status_code for r in answers} == {202}, [r.text for r in answers]
        assert len({r.text for r in answers}) == 1
        replayed = [r.headers.get("Idempotent-Replayed") for r in answers]
        assert replayed.count(None) == 1 and replayed.count("true") == 19
        assert events_of(kit) == 2  # one scan and its first_scan
        clash = await rest.post(
            "/events", json={"event": "scan", "data": {**SCAN, "scan_id": 99}}, headers=headers
        )
        assert clash.status_code == 409 and clash.json()["field"] == "Idempotency-Key"
        long = await rest.post(
            "/events",
            json={"event": "scan", "data": SCAN},
            headers={**headers, "Idempotency-Key": "k" * 256},
        )
        assert long.status_code == 422 and long.json()["field"] == "Idempotency-Key"
    assert events_of(kit) == 2

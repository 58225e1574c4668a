"""Retention (JUSTSCAN_RETENTION_DAYS): finished deliveries and their attempts, events left
without deliveries and expired idempotency keys are deleted; open work and `first_scans` are
kept. On both databases, through the store's sweep and the dispatcher's scheduled job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import anyio
import pytest
from sqlalchemy import func
from sqlmodel import select

from justscan_mcp.config import Settings
from justscan_mcp.errors import ConfigError
from justscan_mcp.models import DeliveryAttempt, Event, FirstScan, IdempotencyKey, utcnow
from tests.conftest import TeamKit, make_team, own_database
from tests.receiver import Receiver, Reply
from tests.test_delivery import until
from tests.test_faults import emit, final, hook, running


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This module's own database: a sweep deletes finished deliveries of every team, oldest
    first and 1,000 at a time, so on the shared database it would delete other modules' rows
    and, behind more than 1,000 of theirs, miss this test's own."""
    with own_database(
        request, request.param, tmp_path_factory.mktemp("retention"), "justscan_retention"
    ) as url:
        yield url


def count(kit: TeamKit, model, *where) -> int:
    with kit.app.store.session() as s:
        return s.exec(select(func.count()).select_from(model).where(*where)).one()


def test_the_setting_takes_decimals_and_zero_and_names_itself_when_wrong():
    assert Settings.from_env({"JUSTSCAN_RETENTION_DAYS": "0.5"}).retention_days == 0.5
    assert Settings.from_env({"JUSTSCAN_RETENTION_DAYS": "0"}).retention_days == 0
    assert Settings.from_env({}).retention_days == 30
    for bad in ("-1", "soon", "inf"):
        with pytest.raises(ConfigError, match="JUSTSCAN_RETENTION_DAYS"):
            Settings.from_env({"JUSTSCAN_RETENTION_DAYS": bad})


def test_the_sweep_deletes_what_is_old_and_finished_and_keeps_first_scans(kit: TeamKit):
    svc = kit.app.service
    w = svc.create_webhook(principal=kit.principal(), url="https://93.184.216.34/r", events=["scan"])
    first = svc.emit_event(team_id=kit.team.id, event="scan", data={"qr_code_id": 5, "scan_id": 1})
    second = svc.emit_event(team_id=kit.team.id, event="scan", data={"qr_code_id": 5, "scan_id": 2})
    # The first scan's delivery ends (cancelled by a deactivation: failed); the second stays open.
    svc.update_webhook(principal=kit.principal(), webhook_id=w.id, changes={"active": False})
    svc.update_webhook(principal=kit.principal(), webhook_id=w.id, changes={"active": True})
    kept_open = svc.emit_event(team_id=kit.team.id, event="scan", data={"qr_code_id": 5, "scan_id": 3})
    keyed = svc.emit_event(
        team_id=kit.team.id, event="scan", data={"qr_code_id": 6, "scan_id": 1}, idempotency_key="old"
    )
    events_before = count(kit, Event, Event.team_id == kit.team.id)
    later = utcnow() + timedelta(days=31)
    purged = kit.app.store.purge(before=later - timedelta(days=30), now=later, batch=1000)
    assert not purged.skipped
    logged = svc.list_deliveries(principal=kit.principal(), webhook_id=w.id, limit=100).deliveries
    # Only open work is left for this webhook: the finished deliveries (and attempts) are gone.
    assert sorted(d.id for d in logged) == sorted([*kept_open.deliveries, *keyed.deliveries])
    gone = [*first.deliveries, *second.deliveries]
    assert all(d not in [x.id for x in logged] for d in gone)
    assert count(kit, DeliveryAttempt, DeliveryAttempt.delivery_id.in_(gone)) == 0  # type: ignore[attr-defined]
    # Events without deliveries went (the first_scan events: this webhook takes scans only),
    # except the scans that decided a first_scan, which `first_scans` points at.
    assert count(kit, FirstScan, FirstScan.team_id == kit.team.id) == 2
    firsts = count(kit, Event, Event.team_id == kit.team.id, Event.name == "first_scan")
    assert firsts == 0
    left = count(kit, Event, Event.team_id == kit.team.id)
    assert left < events_before
    with kit.app.store.session() as s:
        decided = s.exec(select(FirstScan.event_id).where(FirstScan.team_id == kit.team.id)).all()
        assert all(s.get(Event, eid) is not None for eid in decided)
    assert count(kit, IdempotencyKey, IdempotencyKey.team_id == kit.team.id) == 0
    # First scans still decide: scanning QR 5 again is not a first scan.
    svc.emit_event(team_id=kit.team.id, event="scan", data={"qr_code_id": 5, "scan_id": 4})
    assert count(kit, Event, Event.team_id == kit.team.id, Event.name == "first_scan") == 0


def test_retention_zero_keeps_deliveries_and_events(kit: TeamKit):
    svc = kit.app.service
    svc.emit_event(team_id=kit.team.id, event="scan", data={"qr_code_id": 8, "scan_id": 1})
    before = count(kit, Event, Event.team_id == kit.team.id)
    later = utcnow() + timedelta(days=3650)
    purged = kit.app.store.purge(before=None, now=later)
    assert (purged.deliveries, purged.events) == (0, 0)
    assert count(kit, Event, Event.team_id == kit.team.id) == before


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


@pytest.mark.anyio
async def test_the_dispatcher_schedules_the_sweep_and_it_deletes_old_deliveries(
    db_url: str, receiver: Receiver
):
    async with running(db_url, retention_days=0.5 / 86400) as app:  # half a second
        kit = make_team(app, "retention")
        hook(kit, receiver.url("/kept"), "/kept", receiver)
        receiver.expect("/kept", Reply(204, body=b""))
        (did,) = emit(app, kit)
        await until(lambda: final(app, kit, did), what="the delivery to finish")
        dispatcher = app.service.on_recorded.__self__  # the local dispatcher, through its wake()
        assert dispatcher._scheduler.get_job("retention") is not None
        deadline = time.monotonic() + 20
        while app.store.get_delivery(team_id=kit.team.id, delivery_id=did) is not None:
            assert time.monotonic() < deadline, "the finished delivery was never swept"
            await dispatcher.sweep()
            await anyio.sleep(0.05)

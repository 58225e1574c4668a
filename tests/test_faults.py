"""The delivery engine under faults, on SQLite and PostgreSQL, with a real receiver on 127.0.0.1:
odd response bytes, rows the database refuses, errors before a send, stalls past the lease, clock
skew, deactivation under a send, a receiver that never answers, and races with webhook changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from datetime import timedelta

import anyio
import pytest
from sqlalchemy import create_engine, event, text, update
from sqlmodel import Session, col, select

from justscan_mcp.app import App
from justscan_mcp.dispatcher import Dispatcher
from justscan_mcp.errors import StoreUnavailable
from justscan_mcp.models import Delivery, DeliveryAttempt, Webhook, utcnow
from justscan_mcp.store.db import normalise_url
from tests.conftest import TeamKit, make_team
from tests.receiver import BlackHole, Receiver, Reply
from tests.test_delivery import fast_settings, until

pytestmark = pytest.mark.anyio

# The compressed schedule and the `until` wait of the delivery tests.
settings = fast_settings


@contextlib.asynccontextmanager
async def running(db_url: str, **changes) -> AsyncIterator[App]:
    """An app with its dispatcher running in this event loop."""
    app = App.build(settings(db_url, **changes))
    app.prepare()
    async with app.lifespan(dispatcher=True):
        await until(lambda: app.ready, what="dispatcher ready")
        yield app


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


def hook(kit: TeamKit, url: str, path: str | None = None, receiver: Receiver | None = None):
    created = kit.app.service.create_webhook(principal=kit.principal(), url=url, events=["scan"])
    if receiver is not None and path is not None:
        receiver.secrets[path] = created.secret
    return created


def scan(n: int = 1) -> dict:
    return {"qr_code_id": 5000 + n, "scan_id": n}


def emit(app: App, kit: TeamKit, n: int = 1) -> list[int]:
    return app.service.emit_event(team_id=kit.team.id, event="scan", data=scan(n)).deliveries


def delivery(app: App, kit: TeamKit, delivery_id: int):
    return app.store.get_delivery(team_id=kit.team.id, delivery_id=delivery_id)


def final(app: App, kit: TeamKit, delivery_id: int):
    found = delivery(app, kit, delivery_id)
    return found if found and found[0].state in ("succeeded", "failed") else None


# --- odd bytes and rows the database refuses --------------------------------------------------


@pytest.mark.parametrize(
    ("body", "stored"),
    [(b"ok\x00", "ok\ufffd"), (b"\xff\xfeok", "\ufffd\ufffdok"), (b"caf\xc3", "caf\ufffd")],
    ids=["nul", "invalid-utf8", "cut-utf8"],
)
async def test_nul_and_invalid_utf8_bodies_are_stored_as_replacement_characters(
    db_url: str, receiver: Receiver, body: bytes, stored: str
):
    """PostgreSQL refuses NUL in text: the attempt insert raised DataError and the writer dropped
    the whole batch, so the delivery was sent again after every lease, forever."""
    async with running(db_url) as app:
        kit = make_team(app, "bytes")
        w = hook(kit, receiver.url("/odd"), "/odd", receiver)
        fine = hook(kit, receiver.url("/fine"), "/fine", receiver)
        receiver.expect("/odd", Reply(200, body=body))
        ids = emit(app, kit)
        assert len(ids) == 2
        for did in ids:
            await until(lambda did=did: final(app, kit, did), what=f"delivery {did} final")
        by_hook = {delivery(app, kit, did)[0].webhook_id: delivery(app, kit, did) for did in ids}
        d, attempts = by_hook[w.id]
        assert d.state == "succeeded" and [a.number for a in attempts] == [1]
        assert attempts[0].response_body == stored
        assert by_hook[fine.id][0].state == "succeeded"
        assert len(receiver.at("/odd")) == 1 and len(receiver.at("/fine")) == 1


async def test_a_row_the_database_refuses_costs_only_that_row(db_url: str, receiver: Receiver):
    """Any error in complete() that is not an outage: the batch is saved row by row, and the row
    that still fails is recorded as a failed attempt that says why (nothing is dropped)."""
    app = App.build(settings(db_url))
    app.prepare()
    kit = make_team(app, "refused")
    hooks = [hook(kit, receiver.url(f"/r{i}"), f"/r{i}", receiver) for i in range(4)]
    ids = emit(app, kit)
    assert len(ids) == 4
    poison = ids[2]
    dispatcher = Dispatcher(app.store, app.settings)
    real = app.store.complete

    def complete(*, worker, results, now):
        if any(r.delivery_id == poison and r.error is None for r in results):
            raise RuntimeError("value out of range for this column")
        return real(worker=worker, results=results, now=now)

    app.store.complete = complete  # type: ignore[method-assign]
    jobs = [
        j
        for j in app.store.claim_due(claim="c", now=utcnow(), lease_seconds=60, limit=1000)
        if j.delivery_id in ids
    ]
    assert len(jobs) == 4
    from justscan_mcp.sender import SendResult

    batch = [dispatcher._result(j, SendResult(200, "ok", None, 3), utcnow()) for j in jobs]
    await dispatcher._save(batch)
    for did in ids:
        d, attempts = delivery(app, kit, did)
        assert [a.number for a in attempts] == [1], did
        if did == poison:
            assert d.state == "retrying" and d.lease_owner is None
            assert attempts[0].status_code is None
            assert "could not be stored" in attempts[0].error and "out of range" in attempts[0].error
        else:
            assert d.state == "succeeded" and attempts[0].status_code == 200
    assert len(hooks) == 4
    app.close()


async def test_an_error_before_the_send_is_a_failed_attempt_not_a_lease_forever(
    db_url: str, receiver: Receiver
):
    """A malformed stored secret makes signing raise inside _deliver: the delivery must still
    move through its attempts and end `failed`, not be leased again and again."""
    async with running(db_url) as app:
        kit = make_team(app, "broken-secret")
        w = hook(kit, receiver.url("/never"), "/never", receiver)
        with app.store.session() as s:
            s.execute(update(Webhook).where(Webhook.id == w.id).values(secret="whsec_not base64!"))
        (did,) = emit(app, kit)
        d, attempts = await until(lambda: final(app, kit, did), what="the delivery to end")
        assert d.state == "failed"
        assert [a.number for a in attempts] == [1, 2, 3, 4]
        assert all(a.status_code is None and a.error.startswith("internal error") for a in attempts)
        assert receiver.at("/never") == []


# --- leases -----------------------------------------------------------------------------------


async def test_a_stall_past_the_lease_never_saves_a_result_twice(db_url: str, receiver: Receiver, caplog):
    """The writer stalls longer than the lease: the delivery is claimed again (by this same
    process) and sent once more. Both results then reach one save. Only the claim that holds the
    lease may save; before claim tokens the two rows collided on (delivery_id, number), the whole
    batch was dropped and the delivery was sent a third time."""
    async with running(db_url) as app:
        kit = make_team(app, "stall")
        first = hook(kit, receiver.url("/first"), "/first", receiver)
        target = hook(kit, receiver.url("/target"), "/target", receiver)
        real = app.store.complete
        stalled = threading.Event()

        def complete(**kwargs):
            if not stalled.is_set():
                stalled.set()
                time.sleep(3.5)  # the stall: longer than the 2 s lease, shorter than two
            return real(**kwargs)

        app.store.complete = complete  # type: ignore[method-assign]
        switch(app, target.id, active=False)  # the first event reaches only /first
        emit(app, kit, 1)
        await until(lambda: stalled.is_set(), what="the writer to stall")
        switch(app, first.id, active=False)  # the second only /target
        switch(app, target.id, active=True)
        caplog.set_level(logging.INFO, logger="justscan_mcp")
        (did,) = emit(app, kit, 2)
        d, attempts = await until(lambda: final(app, kit, did), timeout=30, what="the target delivery")
        assert d.state == "succeeded" and [a.number for a in attempts] == [1]
        assert len(receiver.at("/target")) == 2  # the stall's one duplicate send, and no more
        assert "failed unexpectedly" not in caplog.text and "saving them one by one" not in caplog.text
        assert f"delivery {did}: lease lost" in caplog.text


def switch(app: App, webhook_id: int, *, active: bool) -> None:
    """Flip `active` in the table only (no cancellation): which webhooks an event fans out to."""
    with app.store.session() as s:
        s.execute(update(Webhook).where(Webhook.id == webhook_id).values(active=active))


async def test_a_process_whose_clock_runs_ahead_does_not_take_live_leases(db_url: str, receiver: Receiver):
    """Leases are judged by the database's clock: a dispatcher whose own clock is an hour ahead
    must not think another process's fresh lease has expired and send the delivery again."""
    async with running(db_url, delivery_timeout=3.0) as app:
        kit = make_team(app, "skew")
        hook(kit, receiver.url("/skew"), "/skew", receiver)
        receiver.expect("/skew", Reply(200, delay=1.5))
        (did,) = emit(app, kit)
        await until(lambda: receiver.at("/skew"), what="the first send")
        ahead = Dispatcher(app.store, app.settings, clock=lambda: utcnow() + timedelta(hours=1))
        await ahead.start()
        try:
            await until(lambda: final(app, kit, did), what="the delivery to end")
        finally:
            await ahead.stop()
        assert len(receiver.at("/skew")) == 1
        d, attempts = delivery(app, kit, did)
        assert d.state == "succeeded" and [a.number for a in attempts] == [1]


# --- inactive webhooks ------------------------------------------------------------------------


async def test_deactivation_under_a_send_ends_the_delivery_failed_and_logs_the_attempt(
    db_url: str, receiver: Receiver
):
    async with running(db_url, delivery_timeout=3.0) as app:
        kit = make_team(app, "deactivate")
        w = hook(kit, receiver.url("/busy"), "/busy", receiver)
        receiver.expect("/busy", Reply(503, delay=1.0))
        (did,) = emit(app, kit)
        await until(lambda: receiver.at("/busy"), what="the send to be in flight")
        app.service.update_webhook(principal=kit.principal(), webhook_id=w.id, changes={"active": False})
        d, attempts = await until(
            lambda: (found := delivery(app, kit, did)) and found[1] and found, what="the in-flight attempt"
        )
        assert d.state == "failed" and d.note == "cancelled: webhook deactivated"
        assert [(a.number, a.status_code, a.next_retry_at) for a in attempts] == [(1, 503, None)]
        assert d.lease_owner is None and d.lease_expires_at is None
        # Switching it back on sends nothing that was cancelled.
        app.service.update_webhook(principal=kit.principal(), webhook_id=w.id, changes={"active": True})
        (later,) = emit(app, kit, 2)
        await until(lambda: final(app, kit, later), what="a new delivery")
        assert len(receiver.at("/busy")) == 2
        assert delivery(app, kit, did)[0].state == "failed"


async def test_a_test_delivery_reaches_an_inactive_webhook(db_url: str, receiver: Receiver):
    async with running(db_url) as app:
        kit = make_team(app, "test-inactive")
        w = hook(kit, receiver.url("/check"), "/check", receiver)
        app.service.update_webhook(principal=kit.principal(), webhook_id=w.id, changes={"active": False})
        receiver.expect("/check", Reply(204, body=b""))
        outcome = await app.service.test_webhook(principal=kit.principal(), webhook_id=w.id)
        assert outcome.state == "succeeded" and outcome.status_code == 204
        assert [r.verified for r in receiver.at("/check")] == [True]


async def test_a_test_delivery_is_signalled_by_the_local_dispatcher_not_polled(
    db_url: str, receiver: Receiver
):
    """test_webhook read the database every 20 ms until the attempt was saved (50 reads a second
    per waiting caller). With the dispatcher in this process its save signals the caller."""
    from mcp import Client

    from justscan_mcp.mcp_server import build_mcp_server

    async with running(db_url, delivery_timeout=5.0) as app:
        kit = make_team(app, "test-signal")
        w = hook(kit, receiver.url("/slow-check"), "/slow-check", receiver)
        receiver.expect("/slow-check", Reply(204, body=b"", delay=1.0))
        reads = 0
        real = app.service.test_outcome

        def counted(**kwargs):
            nonlocal reads
            reads += 1
            return real(**kwargs)

        app.service.test_outcome = counted  # type: ignore[method-assign]
        async with Client(build_mcp_server(app, fixed_key_id=kit.rw.id)) as c:
            result = await c.call_tool("test_webhook", {"webhook_id": w.id})
        assert result.structured_content["state"] == "succeeded", result
        assert reads <= 4, f"{reads} database reads while one test delivery took 1 s"


def test_deactivation_cancels_open_deliveries_but_not_a_pending_test(app: App):
    kit = make_team(app, "cancel-not-test")
    w = app.service.create_webhook(principal=kit.principal(), url="https://93.184.216.34/c", events=["scan"])
    (scanned,) = emit(app, kit)
    test = app.service.send_test(principal=kit.principal(), webhook_id=w.id)
    app.service.update_webhook(principal=kit.principal(), webhook_id=w.id, changes={"active": False})
    assert delivery(app, kit, scanned)[0].state == "failed"
    assert delivery(app, kit, test)[0].state == "pending"


async def test_redeliver_to_an_inactive_webhook_is_refused_and_stores_nothing(db_url: str, receiver):
    from justscan_mcp.errors import Conflict

    app = App.build(settings(db_url))
    app.prepare()
    kit = make_team(app, "redeliver-inactive")
    w = hook(kit, receiver.url("/x"), "/x", receiver)
    (did,) = emit(app, kit)
    app.service.update_webhook(principal=kit.principal(), webhook_id=w.id, changes={"active": False})
    with pytest.raises(Conflict) as refused:
        app.service.redeliver(principal=kit.principal(), delivery_id=did)
    assert refused.value.field == "webhook_id"
    log = app.service.list_deliveries(principal=kit.principal(), webhook_id=w.id).deliveries
    assert [d.id for d in log] == [did]
    app.close()


# --- isolation --------------------------------------------------------------------------------


@pytest.mark.serial
async def test_a_black_holed_receiver_does_not_delay_other_webhooks(db_url: str, receiver: Receiver):
    """200 deliveries queued for a receiver that accepts and never answers, 16 slots: another
    webhook's deliveries must each arrive in less than one delivery timeout."""
    timeout = 2.0
    async with running(db_url, delivery_timeout=timeout, max_in_flight=16, retry_schedule=(30.0,)) as app:
        with BlackHole() as hole:
            kit = make_team(app, "isolation")
            hook(kit, hole.url("/void"))
            other = make_team(app, "isolation-other")
            hook(other, receiver.url("/healthy"), "/healthy", receiver)
            # The dead endpoint's backlog first: it is due before anything the other team records.
            for n in range(200):
                app.service.emit_event(team_id=kit.team.id, event="scan", data=scan(n + 1))
            await until(lambda: hole.accepted >= 1, what="the black hole to hold sends")
            latencies = []
            for n in range(12):
                start = time.monotonic()
                app.service.emit_event(team_id=other.team.id, event="scan", data=scan(n + 1))
                await until(lambda n=n: len(receiver.at("/healthy")) > n, what="the healthy delivery")
                latencies.append(time.monotonic() - start)
                if n % 3 == 2:  # spread the healthy events over the dead endpoint's timeouts
                    seen = hole.accepted
                    await until(lambda seen=seen: hole.accepted > seen, what="the black hole to take more")
            assert max(latencies) < timeout, latencies
            assert hole.accepted >= 2  # the dead endpoint kept being tried meanwhile


# --- races ------------------------------------------------------------------------------------


def test_events_racing_deletes_and_deactivations_leave_no_error_and_no_zombie(app: App):
    """PostgreSQL: an event that read the team's webhooks before a delete committed failed on the
    foreign key (a 500, the event lost); one racing a deactivation left an open delivery to an
    inactive webhook. The fan-out now locks the rows it reads."""
    kit = make_team(app, "race")
    errors: list[BaseException] = []
    for round_ in range(15):
        hooks = [
            app.service.create_webhook(
                principal=kit.principal(), url=f"https://93.184.216.34/r{round_}/{i}", events=["scan"]
            )
            for i in range(4)
        ]
        barrier = threading.Barrier(8)

        def emitter(i: int, barrier=barrier) -> None:
            barrier.wait()
            for k in range(5):
                try:
                    app.service.emit_event(team_id=kit.team.id, event="scan", data=scan(1 + i * 10 + k))
                except BaseException as exc:
                    errors.append(exc)

        def changer(i: int, h=hooks, barrier=barrier) -> None:
            barrier.wait()
            try:
                if i % 2:
                    app.service.delete_webhook(principal=kit.principal(), webhook_id=h[i].id)
                else:
                    app.service.update_webhook(
                        principal=kit.principal(), webhook_id=h[i].id, changes={"active": False}
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=emitter, args=(i,)) for i in range(4)]
        threads += [threading.Thread(target=changer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with app.store.session() as s:
            zombies = s.execute(
                text(
                    "SELECT count(*) FROM deliveries d JOIN webhooks w ON w.id = d.webhook_id"
                    " WHERE d.team_id = :t AND NOT w.active AND d.state IN ('pending', 'retrying')"
                ),
                {"t": kit.team.id},
            ).scalar()
        assert zombies == 0, f"round {round_}: {zombies} open deliveries to inactive webhooks"


class _SpiedCursor:
    """A driver cursor that runs `before(statement)` ahead of each statement: driver SQL
    bypasses SQLAlchemy's cursor events."""

    def __init__(self, cur, before) -> None:
        self._cur, self._before = cur, before

    def execute(self, statement, *args):
        self._before(statement)
        return self._cur.execute(statement, *args)

    def __getattr__(self, name: str):
        return getattr(self._cur, name)


@pytest.mark.parametrize("reader", ["get_delivery", "list_deliveries", "last_deliveries", "webhook_stats"])
def test_a_delivery_and_its_attempts_are_read_at_one_moment(app: App, db_url: str, reader: str, monkeypatch):
    """PostgreSQL read the delivery rows and their attempts in two statements, each at its own
    moment (READ COMMITTED): a result saved in between came back as a delivery still leased with
    attempt_count 0 beside the attempt that ended it (CI of ab6b76c), and statistics counted a
    delivery as pending beside the attempt that made it succeed. Here another connection saves
    an attempt exactly between the two reads."""
    kit = make_team(app, f"one-moment-{reader}")
    w = hook(kit, "https://93.184.216.34/moment")
    (did,) = emit(app, kit)
    other = create_engine(normalise_url(db_url))
    armed = [True]

    def save_between(statement: str) -> None:
        if armed[0] and "FROM delivery_attempts" in statement:
            armed[0] = False
            with Session(other) as s:
                s.execute(
                    update(Delivery)
                    .where(col(Delivery.id) == did)
                    .values(state="succeeded", attempt_count=1, next_attempt_at=None)
                )
                s.add(
                    DeliveryAttempt(
                        delivery_id=did,
                        webhook_id=w.id,
                        number=1,
                        started_at=utcnow(),
                        duration_ms=5,
                        status_code=200,
                        outcome="2xx",
                    )
                )
                s.commit()

    def orm_hook(conn, cursor, statement, parameters, context, executemany) -> None:
        save_between(statement)

    real_driver = app.store._driver

    @contextlib.contextmanager
    def spied_driver(**kwargs):
        with real_driver(**kwargs) as cur:
            yield _SpiedCursor(cur, save_between)

    monkeypatch.setattr(app.store, "_driver", spied_driver)
    event.listen(app.store.engine, "before_cursor_execute", orm_hook)
    try:
        if reader == "get_delivery":
            found = app.store.get_delivery(team_id=kit.team.id, delivery_id=did)
            assert found is not None
            d, attempts = found
        elif reader == "list_deliveries":
            ((d, attempts),) = app.store.list_deliveries(webhook_id=w.id, before_id=None, limit=10)
        elif reader == "last_deliveries":
            d, last = app.store.last_deliveries([w.id])[w.id]
            attempts = [last] if last is not None else []
        else:
            stats = app.store.webhook_stats(webhook_id=w.id, since=utcnow() - timedelta(hours=1))
    finally:
        event.remove(app.store.engine, "before_cursor_execute", orm_hook)
        other.dispose()
    assert not armed[0], "the save between the two reads did not happen"
    if reader == "webhook_stats":
        tried = sum(n for _, _, n, _ in stats.attempts)
        assert [(state, n) for state, _, n in stats.deliveries] == [("succeeded" if tried else "pending", 1)]
        assert (stats.p50 is None) == (tried == 0)
        return
    assert (d.state, d.attempt_count) == (("succeeded", 1) if attempts else ("pending", 0))
    assert [a.number for a in attempts] == list(range(1, d.attempt_count + 1))


def test_concurrent_rotations_keep_both_new_secrets(app: App):
    """Each rotation read the secret and wrote in a second transaction: two at once both kept the
    original as `previous_secret`, and the first new secret, already handed out, was lost."""
    kit = make_team(app, "rotate")
    for round_ in range(10):
        w = app.service.create_webhook(
            principal=kit.principal(), url=f"https://93.184.216.34/rot{round_}", events=["scan"]
        )
        barrier = threading.Barrier(2)
        issued: list[str] = []

        def rotate(w=w, barrier=barrier, issued=issued) -> None:
            barrier.wait()
            issued.append(app.service.rotate_secret(principal=kit.principal(), webhook_id=w.id).secret)

        threads = [threading.Thread(target=rotate) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        row = app.store.get_webhook(team_id=kit.team.id, webhook_id=w.id)
        assert {row.secret, row.previous_secret} == set(issued), f"round {round_}"


# --- the store's error translation ------------------------------------------------------------


def test_a_wrong_statement_is_a_bug_not_an_outage(app: App):
    """SQLite reports a wrong statement as OperationalError, like a locked file; it must not be
    taken for "database unavailable" (retried forever by the dispatcher)."""
    from sqlalchemy.exc import DBAPIError

    with pytest.raises(DBAPIError) as raised, app.store.session() as s:
        s.execute(text("SELECT no_such_column FROM deliveries"))
    assert not isinstance(raised.value, StoreUnavailable)
    with pytest.raises(StoreUnavailable), app.store.session():
        raise app.store._driver_errors[0]("database is locked")  # an outage stays an outage


# --- where deliveries may go ------------------------------------------------------------------

# Addresses Python 3.11's `is_global` calls global, or that only an explicit list catches, and one
# of each embedded-IPv4 form that hides a private address.
NOT_PUBLIC = [
    "::127.0.0.1",  # IPv4-compatible (deprecated): was accepted
    "::a00:1",  # IPv4-compatible 10.0.0.1
    "64:ff9b:1::7f00:1",  # local-use NAT64: was accepted
    "fec0::1",  # site-local: was accepted
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "::ffff:169.254.169.254",  # IPv4-mapped metadata service
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo whose client is 10.0.0.1
    "100::1",  # discard-only
    "2001:db8::1",  # documentation
    "fc00::1",
    "fe80::1",
    "ff02::1",
    "100.64.0.1",
    "198.18.0.1",
    "192.0.0.8",
    "192.88.99.1",
    "0.1.2.3",
    "240.0.0.1",
    "255.255.255.255",
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses_are_refused_at_creation(address: str):
    from justscan_mcp.errors import InvalidInput
    from justscan_mcp.targets import validate_webhook_url

    host = f"[{address}]" if ":" in address else address
    with pytest.raises(InvalidInput) as literal:
        validate_webhook_url(f"https://{host}/h", allow_private=False, resolve=lambda h, p: [])
    assert literal.value.field == "url"
    with pytest.raises(InvalidInput) as named:
        validate_webhook_url("https://named.test/h", allow_private=False, resolve=lambda h, p: [address])
    assert address.split("%")[0] in named.value.message or "resolves to" in named.value.message


@pytest.mark.parametrize("address", NOT_PUBLIC)
async def test_non_public_addresses_are_refused_at_connect_time(address: str, monkeypatch):
    """At delivery time: an IP literal (which aiohttp does not resolve) and a name whose DNS answer
    changed since creation are both judged before any connection."""
    import socket

    from justscan_mcp.sender import Sender

    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host == "rebound.test":
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr = (address, 443, 0, 0) if family == socket.AF_INET6 else (address, 443)
            return [(family, socket.SOCK_STREAM, 6, "", sockaddr)]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    sender = Sender(timeout=2, allow_private=False)
    await sender.start()
    try:
        host = f"[{address}]" if ":" in address else address
        for url in (f"https://{host}/h", "https://rebound.test/h"):
            outcome = await sender.post(url, b"{}", {})
            assert outcome.status_code is None and outcome.error.startswith("refused"), (url, outcome)
    finally:
        await sender.close()


async def test_the_host_is_judged_as_the_client_parses_it(receiver: Receiver):
    """yarl (aiohttp's parser) turns `①②⑦.0.0.1` into the literal 127.0.0.1 and connects without a
    lookup; urllib kept it as a name, so the literal check never saw a loopback address."""
    from justscan_mcp.errors import InvalidInput
    from justscan_mcp.sender import Sender
    from justscan_mcp.targets import validate_webhook_url

    url = f"http://①②⑦.0.0.1:{receiver.port}/sneaky"
    sender = Sender(timeout=2, allow_private=False)
    await sender.start()
    try:
        outcome = await sender.post(url, b"{}", {})
    finally:
        await sender.close()
    assert outcome.error == "refused: 127.0.0.1 is not a public address"
    assert receiver.at("/sneaky") == []
    with pytest.raises(InvalidInput, match=r"127\.0\.0\.1"):
        validate_webhook_url(
            f"https://①②⑦.0.0.1:{receiver.port}/", allow_private=False, resolve=lambda h, p: ["8.8.8.8"]
        )


@pytest.mark.serial
async def test_a_slow_name_server_costs_one_lookup_its_time_limit_not_everyone_else(monkeypatch):
    """DNS has its own threads and a per-lookup time limit: a lookup that hangs fails on time, and
    lookups of other names (and the event loop's default executor) do not queue behind it."""
    import socket

    from justscan_mcp.sender import VettingResolver

    release = threading.Event()
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host.startswith("slow"):
            release.wait(30)  # an authoritative server that does not answer
        return real("127.0.0.1" if host.startswith("slow") else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    resolver = VettingResolver(allow_private=True, timeout=0.5)
    try:
        stuck = [asyncio_task(resolver.resolve(f"slow{i}.test", 443)) for i in range(20)]
        start = time.monotonic()
        fast = await resolver.resolve("localhost", 443)
        assert fast and time.monotonic() - start < 0.5  # not behind the stuck lookups' threads
        loop_default = await anyio.to_thread.run_sync(lambda: "default executor free")
        assert loop_default
        for task in stuck:
            with pytest.raises(OSError, match=r"longer than 0\.5s"):
                await task
    finally:
        release.set()
        await resolver.close()


def asyncio_task(coro):
    import asyncio

    return asyncio.ensure_future(coro)


# --- the dispatcher's own upkeep --------------------------------------------------------------


async def test_one_retry_timer_however_many_deliveries_wait(db_url: str, receiver: Receiver):
    """A job per retrying delivery grew without bound behind a dead high-volume endpoint."""
    app = App.build(settings(db_url, retry_schedule=(30.0, 60.0)))
    app.prepare()
    kit = make_team(app, "timers")
    hook(kit, receiver.url("/down"), "/down", receiver)
    receiver.expect("/down", *[Reply(500)] * 50)
    dispatcher = Dispatcher(app.store, app.settings)
    await dispatcher.start()
    try:
        ids = [d for n in range(50) for d in emit(app, kit, n + 1)]
        await until(
            lambda: all(delivery(app, kit, d)[0].state == "retrying" for d in ids), what="50 retrying"
        )
        jobs = dispatcher._scheduler.get_jobs()
        # A fixed set of named jobs (the housekeeping ones run on their own intervals), never one
        # per waiting delivery.
        assert sorted(j.id for j in jobs) == ["disable-failing", "heartbeat", "poll", "retention", "retry"]
        (timer,) = [j for j in jobs if j.id == "retry"]
        # No later than this test's earliest retry (the module's database is shared, so another
        # test's retry may come first).
        earliest = min(delivery(app, kit, d)[0].next_attempt_at for d in ids)
        assert timer.next_run_time <= earliest
    finally:
        await dispatcher.stop()
        app.close()


async def test_stopping_before_or_during_start_does_not_raise(db_url: str):
    app = App.build(settings(db_url))
    app.prepare()
    never_started = Dispatcher(app.store, app.settings)
    await never_started.stop()
    # A stop signal while the database is still being waited for.
    down = App.build(settings("postgresql://postgres@127.0.0.1:1/nothing"))
    async with down.lifespan(dispatcher=True):
        pass
    # And one that lands while the dispatcher starts.
    async with app.lifespan(dispatcher=True):
        await until(lambda: app.ready, what="ready")
    app.close()


async def test_a_retry_timer_that_comes_due_while_the_last_one_reads_the_database_still_fires(
    db_url: str, receiver: Receiver, caplog, monkeypatch
):
    """When the retry timer fired it woke the pump and then, still inside the scheduler's job,
    read the next retry time from the database. A retry saved meanwhile set the timer again; if
    that came due before the read returned, APScheduler skipped the firing ("maximum number of
    running instances reached", a WARNING the CI soak showed), and the timer was left believing
    it was armed: every later retry waited for the poll tick instead of its time. Here the poll
    is 30 s, and the third attempt must come on the timer."""
    app = App.build(settings(db_url))
    app.prepare()
    kit = make_team(app, "timer")
    hook(kit, receiver.url("/t"), "/t", receiver)
    receiver.expect("/t", Reply(500), Reply(500), Reply(200))
    entered, release = threading.Event(), threading.Event()
    real_next_due_after = app.store.next_due_after
    reads = [0]

    def slow_next_due_after(when):
        reads[0] += 1
        if reads[0] == 1:
            entered.set()
            release.wait(20)  # the database taking its time over the first timer's read
        return real_next_due_after(when)

    monkeypatch.setattr(app.store, "next_due_after", slow_next_due_after)
    d = Dispatcher(app.store, settings(db_url, poll_interval=30.0, retry_schedule=(0.5, 0.5, 0.5)))
    await d.start()
    try:
        with caplog.at_level(logging.WARNING):
            emit(app, kit)
            await until(entered.is_set, what="the first timer's read")
            await until(lambda: len(receiver.at("/t")) >= 2, what="the second attempt, on that timer")

            def next_timer_came_due() -> bool:
                skipped = any(
                    "skipped" in r.getMessage() for r in caplog.records if r.name.startswith("apscheduler")
                )
                return skipped or reads[0] >= 2

            await until(next_timer_came_due, what="the next timer coming due during the first read")
            release.set()
            await until(
                lambda: len(receiver.at("/t")) >= 3,
                timeout=10,
                what="the third attempt on the retry timer (the poll tick is 30 s away)",
            )
        warnings = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == []
    finally:
        release.set()
        await d.stop()
        app.close()


async def test_a_stop_lets_a_running_heartbeat_finish_and_leaves_no_beat_behind(
    app: App, db_url: str, caplog, monkeypatch
):
    """A stop used to shut APScheduler down under a running job: a heartbeat waiting for its
    database write was cancelled, APScheduler logged that as the job's error with a traceback
    (the soak counts it as an unhandled exception), and the write, already in its thread, could
    land after the stop had removed this worker's row. Now the stop pauses the scheduler, lets a
    running job finish, and then removes the row."""
    in_beat, beat_written = threading.Event(), threading.Event()
    real_beat = app.store.beat

    def slow_beat(row):
        in_beat.set()
        time.sleep(0.5)  # the database taking its time, in the beat's own thread
        real_beat(row)
        beat_written.set()

    monkeypatch.setattr(app.store, "beat", slow_beat)
    d = Dispatcher(app.store, settings(db_url, poll_interval=0.1))
    await d.start()
    await until(in_beat.is_set, what="a heartbeat writing")
    with caplog.at_level(logging.INFO):
        await d.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    await until(beat_written.is_set, what="the beat's write")  # even one cancelled lands
    assert [b.worker_id for b in app.store.dispatcher_beats()] == []


def test_claim_plans_respect_every_cap_and_avoid_trickling(tmp_path):
    """The pure part of isolation: what the next claim may take, given what is in flight."""
    from justscan_mcp.store import Store

    store = Store.from_url(f"sqlite:///{tmp_path}/p.db")
    d = Dispatcher(store, settings(f"sqlite:///{tmp_path}/p.db", max_in_flight=64))
    assert (d.settings.per_webhook_in_flight, d.settings.slow_lane_in_flight) == (48, 8)
    # What a webhook has claimed counts against twice its cap: 48 sending, 48 waiting for a slot.
    assert (d._claim_cap, d._budget) == (96, 112)
    assert d._plan(112) == ([], 96, [], 8)  # idle: one webhook may claim 96 of 112
    d._per_hook = {1: 95}
    assert d._plan(17)[:2] == ([1], 17)  # 1 of room would cut a claim of 17: skip webhook 1
    assert d._plan(1)[:2] == ([], 1)  # ...but with 1 free it may reach its cap
    d._per_hook = {1: 84}
    assert d._plan(20)[:2] == ([], 12)  # 12 of room is a claim worth making (the line is 96 - 12)
    d._per_hook = {1: 85}
    assert d._plan(20)[:2] == ([1], 20)  # 11 is not
    d._per_hook = {1: 96, 2: 10}
    assert d._plan(6)[:2] == ([1], 6)  # at its cap: skipped; room under webhook 2's cap is 86
    d._per_hook, d._slow, d._slow_open = {1: 84, 3: 8}, {3}, 8
    assert d._plan(20) == ([3], 12, [], 0)  # slow webhooks never use the main pool; the lane is full
    d._slow_open = 5
    assert d._plan(20) == ([3], 12, [3], 3)
    store.close()


def waiting(d: Dispatcher) -> int:
    return sum(len(queue) for queue in d._waiting.values())


def leases(app: App, ids: list[int]) -> dict[int, str | None]:
    with app.store.session() as s:
        return {d.id: d.lease_owner for d in s.exec(select(Delivery).where(col(Delivery.id).in_(ids)))}


async def test_deliveries_claimed_ahead_wait_for_a_slot_and_stale_ones_go_back(app: App, db_url: str):
    """Over its webhook's send cap, a claimed delivery waits in the process and takes the next
    slot of that webhook that frees, with no claim in between. One that waited half the lease
    margin could start a send that outlives its lease (and be taken over mid-send): it goes back
    to the database instead, due at once, and the others keep their lease."""
    kit = make_team(app, "ahead")
    hook_id = hook(kit, "https://93.184.216.34/hook").id  # nothing is sent: this dispatcher is never started
    ids = [emit(app, kit, n)[0] for n in range(1, 7)]
    d = Dispatcher(app.store, settings(db_url, max_in_flight=4, lease_margin=10.0))
    assert (d._cap, d._claim_cap, d._budget) == (3, 6, 7)
    claim = "c" * 24
    jobs = app.store.claim_due(claim=claim, now=utcnow(), lease_seconds=60, limit=6, only=[hook_id])
    assert sorted(j.delivery_id for j in jobs) == sorted(ids)
    at = time.monotonic()
    for job in jobs:
        d._launch(job, slow=False, claimed_at=at)
    assert (d.in_flight, waiting(d), d._jobs.qsize()) == (3, 3, 3)
    started = [d._jobs.get_nowait()[0] for _ in range(3)]
    assert started == jobs[:3]

    d._done(started[0], False)  # a send ends: the first waiting one takes its slot at once
    assert (d.in_flight, waiting(d)) == (3, 2)
    assert d._jobs.get_nowait()[0] == jobs[3]

    d._waiting[hook_id] = deque((job, at - 5.0) for job, _ in d._waiting[hook_id])  # 5 s ago
    d._done(started[1], False)
    assert (d.in_flight, waiting(d), d._open, d._per_hook) == (2, 0, 2, {hook_id: 2})
    await asyncio.gather(*d._handing_back)
    back = {jobs[4].delivery_id, jobs[5].delivery_id}
    assert leases(app, ids) == {i: None if i in back else claim for i in ids}
    assert d._wake.is_set()  # they are due again: the pump looks
    d._db.shutdown()


async def test_a_webhook_turning_slow_hands_back_what_it_claimed_ahead(app: App, db_url: str):
    """What a webhook claimed ahead would take main slots for its timeouts once it is slow: when
    a send shows it slow, its waiting deliveries go back to the database for the slow lane to
    claim; its sends already started finish where they are."""
    from justscan_mcp.sender import SendResult

    kit = make_team(app, "slow-ahead")
    hook_id = hook(kit, "https://93.184.216.34/hook").id
    ids = [emit(app, kit, n)[0] for n in range(1, 7)]
    d = Dispatcher(app.store, settings(db_url, max_in_flight=4, delivery_timeout=2.0, lease_margin=60.0))
    claim = "s" * 24
    jobs = app.store.claim_due(claim=claim, now=utcnow(), lease_seconds=60, limit=6, only=[hook_id])
    for job in jobs:
        d._launch(job, slow=False, claimed_at=time.monotonic())
    d._note_speed(hook_id, SendResult(200, "ok", None, 1200))  # over half the 2 s timeout
    assert hook_id in d._slow
    assert (d.in_flight, waiting(d), d._open, d._per_hook) == (3, 0, 3, {hook_id: 3})
    await asyncio.gather(*d._handing_back)
    sent = {j.delivery_id for j in jobs[:3]}
    assert leases(app, ids) == {i: claim if i in sent else None for i in ids}
    # A main claim that was under way when it turned slow: what it adds waits, and goes back
    # when a send of the webhook ends rather than taking the main slot.
    late = app.store.claim_due(claim="t" * 24, now=utcnow(), lease_seconds=60, limit=3, only=[hook_id])
    assert len(late) == 3
    for job in late:
        d._launch(job, slow=False, claimed_at=time.monotonic())
    assert waiting(d) == 3
    d._done(jobs[0], False)
    assert (d.in_flight, waiting(d), d._jobs.qsize()) == (2, 0, 3)  # the 3 sends launched before
    await asyncio.gather(*d._handing_back)
    assert leases(app, ids) == {i: claim if i in sent else None for i in ids}
    d._db.shutdown()


async def test_a_stop_hands_back_what_was_claimed_ahead_and_nothing_is_lost(db_url: str, receiver: Receiver):
    """A stop waits for the sends that started, not for what was claimed ahead of them: those go
    back to the database at once (not after their leases), and the next start sends every
    delivery exactly once."""
    ids: list[int] = []
    async with running(db_url, max_in_flight=4, delivery_timeout=8.0, lease_margin=60.0) as app:
        kit = make_team(app, "stop-ahead")
        hook(kit, receiver.url("/held"), "/held", receiver)
        receiver.expect("/held", *[Reply(delay=2.0)] * 3)
        ids = [emit(app, kit, n)[0] for n in range(1, 11)]
        await until(lambda: len(receiver.at("/held")) == 3, what="three sends held by the receiver")
        await until(
            lambda: sum(owner is not None for owner in leases(app, ids).values()) == 6,
            what="three more claimed ahead",
        )
    assert len(receiver.at("/held")) == 3  # the stop sent nothing that had not started
    owners = leases(app, ids)
    assert sum(owner is None for owner in owners.values()) == 10, owners  # 3 saved, 7 free
    async with running(db_url, max_in_flight=4) as app:
        await until(lambda: len(receiver.at("/held")) >= 10, what="every delivery")
        await until(lambda: all(final(app, kit, i) for i in ids), what="every delivery saved")
    sent = sorted(int(r.headers["x-webhook-delivery"]) for r in receiver.at("/held"))
    assert sent == sorted(ids)


def _fails_within(call, seconds: float) -> tuple[float, BaseException | None]:
    """Run `call` in a daemon thread; (its time, what it raised), or fail if it still runs after
    `seconds` (the thread is left behind: a hang is the defect)."""
    outcome: list[BaseException | None] = []
    started = time.monotonic()

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        pytest.fail(f"still waiting for the database after {seconds:.0f} s")
    return time.monotonic() - started, outcome[0]


def test_a_database_that_accepts_and_never_answers_fails_the_call_instead_of_hanging():
    """No connect timeout was set, and libpq has none by default: a PostgreSQL host that
    accepted the TCP connection and then said nothing held every request's thread, the
    dispatcher's claim and the server's start for ever (no "not reachable" line, no 503). A
    connection now gives up after CONNECT_TIMEOUT seconds (StoreUnavailable: callers get their
    503 and the dispatcher waits and retries), and a `connect_timeout` in the URL still wins."""
    from justscan_mcp.store import Store
    from justscan_mcp.store.db import CONNECT_TIMEOUT

    with BlackHole() as silent:  # a PostgreSQL host that hangs, or a proxy before a dead one
        store = Store.from_url(f"postgresql://postgres@127.0.0.1:{silent.port}/justscan")
        took, raised = _fails_within(store.ping, CONNECT_TIMEOUT + 10)
        assert isinstance(raised, StoreUnavailable), raised
        assert took >= CONNECT_TIMEOUT - 1, took
        # The LISTEN connection of the dispatcher is made from the same URL.
        assert f"connect_timeout={CONNECT_TIMEOUT}" in (store.listen_dsn() or "")
        store.close()

        own = Store.from_url(f"postgresql://postgres@127.0.0.1:{silent.port}/justscan?connect_timeout=2")
        took, raised = _fails_within(own.ping, 12)
        assert isinstance(raised, StoreUnavailable) and took < CONNECT_TIMEOUT - 1, (took, raised)
        assert "connect_timeout=2" in (own.listen_dsn() or "")
        own.close()


def test_postgresql_connections_notice_a_silent_network_within_a_minute(pg_base_url):
    """A PostgreSQL host that vanishes without a reset (a partition, a failover that moves the
    address) left a statement sent on a pooled connection waiting for the kernel's own
    retransmission limit, about 15 minutes here (tcp_retries2 = 15), and an idle connection,
    such as the dispatcher's LISTEN, never noticed at all. The connections now carry TCP
    keepalives and a TCP user timeout (30 s unacknowledged), so such a call fails as an outage
    within a minute. Packet loss cannot be injected on this machine (no iptables, no netem), so
    this reads the options off the real sockets; a value in the URL still wins."""
    from tests.conftest import missing

    if pg_base_url is None:
        missing("JUSTSCAN_TEST_DATABASE_URL", "this test runs on PostgreSQL; set it")

    def socket_options(url: str) -> tuple[int, int, int, int, int]:
        from justscan_mcp.store import Store

        store = Store.from_url(url)
        try:
            with store._driver(write=False) as cur:
                sock = socket.socket(fileno=os.dup(cur.connection.pgconn.socket))
                try:
                    return (
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                    )
                finally:
                    sock.close()  # the duplicate only: the connection keeps its own descriptor
        finally:
            store.close()

    keepalive, idle, interval, count, user_timeout = socket_options(pg_base_url)
    assert keepalive == 1
    assert idle + interval * count <= 60 and user_timeout == 30_000, (idle, interval, count, user_timeout)
    sep = "&" if "?" in pg_base_url else "?"
    assert socket_options(f"{pg_base_url}{sep}keepalives_idle=45")[1] == 45


def test_a_pooled_connection_the_server_dropped_is_replaced_and_a_busy_one_is_not_pinged(
    pg_base_url, monkeypatch
):
    """The pool pings a connection only when it sat idle (store.db.PING_AFTER_IDLE): a ping
    before every transaction was a round trip in three of the dispatcher's claim. A connection the
    server dropped while it idled is replaced before use, and every connection pooled before it
    goes too; one dropped between two uses within the window fails that one transaction
    (StoreUnavailable, which callers retry) and the next starts over on a new connection."""
    import psycopg

    from justscan_mcp.store import db as store_db
    from tests.conftest import missing, own_pg_database

    if pg_base_url is None:
        missing("JUSTSCAN_TEST_DATABASE_URL", "this test runs on PostgreSQL; set it")
    with own_pg_database(pg_base_url, "justscan_ping") as url:
        dsn = normalise_url(url).replace("postgresql+psycopg://", "postgresql://")
        app = App.build(settings(url))
        app.prepare()
        try:
            kit = make_team(app, "ping")
            principal = kit.principal()
            pings: list[object] = []
            dialect = app.store.engine.dialect
            real_ping = dialect.do_ping
            monkeypatch.setattr(dialect, "do_ping", lambda conn: pings.append(conn) or real_ping(conn))

            def read() -> None:
                app.service.list_webhooks(principal=principal)

            def drop_our_connections() -> None:
                with psycopg.connect(dsn, autocommit=True) as admin:
                    dropped = admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    ).fetchone()
                assert dropped is not None and dropped[0] >= 1

            monkeypatch.setattr(store_db, "PING_AFTER_IDLE", 3600.0)
            for _ in range(20):
                read()
            assert pings == []  # in use a moment ago: no round trip before the transaction

            drop_our_connections()
            with pytest.raises(StoreUnavailable):
                read()  # within the window: the statement meets the dead connection
            read()  # and the pool started over
            assert pings == []

            drop_our_connections()
            monkeypatch.setattr(store_db, "PING_AFTER_IDLE", 0.0)
            read()  # idle past the window: pinged, found dead, replaced before use
            assert pings
        finally:
            app.close()

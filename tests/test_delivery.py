"""The delivery engine against a real receiver on 127.0.0.1, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import AsyncIterator

import anyio
import pytest
from sqlalchemy import func, select
from standardwebhooks import Webhook as StandardWebhook

from justscan_mcp.app import App
from justscan_mcp.config import Settings
from justscan_mcp.errors import InvalidInput, NotFound
from justscan_mcp.models import Delivery, Event
from tests.conftest import TeamKit, make_team
from tests.receiver import Receiver, Reply

pytestmark = pytest.mark.anyio

SCHEDULE = (0.2, 0.4, 0.6)


def fast_settings(db_url: str, **changes) -> Settings:
    base = dict(
        database_url=db_url,
        allow_private_targets=True,
        retry_schedule=SCHEDULE,
        delivery_timeout=1.0,
        poll_interval=0.1,
        lease_margin=1.0,
    )
    return Settings(**(base | changes))


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


@pytest.fixture
async def live(db_url: str) -> AsyncIterator[App]:
    """An app with its dispatcher running in this event loop."""
    app = App.build(fast_settings(db_url))
    app.prepare()
    async with app.lifespan(dispatcher=True):
        await until(lambda: app.ready, what="dispatcher ready")
        yield app


async def until(predicate, *, timeout: float = 20.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await anyio.to_thread.run_sync(predicate)
        if value:
            return value
        await anyio.sleep(0.02)
    pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")


def hook(kit: TeamKit, receiver: Receiver, path: str, events: list[str]):
    created = kit.app.service.create_webhook(principal=kit.principal(), url=receiver.url(path), events=events)
    receiver.secrets[path] = created.secret
    return created


def scan(n: int = 1, **extra) -> dict:
    return {"qr_code_id": 1000 + n, "scan_id": n, "device": "iPhone", "country": "DE"} | extra


def count(app: App, model, team_id: int, name: str | None = None) -> int:
    q = select(func.count()).select_from(model).where(model.team_id == team_id)
    if name is not None:
        q = q.where(model.name == name)
    with app.store.session() as s:
        return int(s.scalar(q))


def log_of(app: App, kit: TeamKit, webhook_id: int):
    return app.service.list_deliveries(principal=kit.principal(), webhook_id=webhook_id, limit=100).deliveries


async def test_scan_reaches_subscribed_webhooks_signed_and_not_the_unsubscribed(
    live: App, receiver: Receiver
):
    kit = make_team(live, "fan")
    a = hook(kit, receiver, "/a", ["scan"])
    b = hook(kit, receiver, "/b", ["scan", "form_submit"])
    hook(kit, receiver, "/forms", ["form_submit"])
    other = make_team(live, "fan-other")
    hook(other, receiver, "/other", ["scan"])
    result = live.service.emit_event(team_id=kit.team.id, event="scan", data=scan(qr_code_id=77))
    await until(lambda: len(receiver.at("/a")) == 1 and len(receiver.at("/b")) == 1, what="two deliveries")
    await until(
        lambda: all(d.state == "succeeded" for d in log_of(live, kit, a.id) + log_of(live, kit, b.id))
    )
    assert receiver.at("/forms") == [] and receiver.at("/other") == []
    for path, webhook in (("/a", a), ("/b", b)):
        (got,) = receiver.at(path)
        assert got.verified, "guide's Python snippet must verify X-Webhook-Signature"
        body = json.loads(got.body)
        assert body["event"] == "scan" and body["data"]["qr_code_id"] == 77
        assert body["timestamp"].endswith("+00:00")
        assert got.body == json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()  # compact
        h = got.headers
        assert h["content-type"] == "application/json"
        assert h["x-webhook-event"] == "scan"
        assert h["user-agent"].startswith("justscan-webhooks/")
        assert int(h["x-webhook-delivery"]) in result.deliveries
        assert h["webhook-id"] == h["x-webhook-delivery"]
        # Standard Webhooks library verifies the same delivery with the same secret.
        StandardWebhook(webhook.secret).verify(
            got.body, {k: h[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
        )
    # first_scan also fired for that new QR code, but nobody here subscribes to it.
    assert len(result.deliveries) == 2


async def test_first_scan_exactly_once_per_qr_code_under_concurrent_scans(live: App, receiver: Receiver):
    kit = make_team(live, "first")
    firsts = hook(kit, receiver, "/first", ["first_scan"])
    scans = hook(kit, receiver, "/scans", ["scan"])
    errors: list[BaseException] = []
    results = []

    def one(i: int) -> None:
        try:
            results.append(
                live.service.emit_event(team_id=kit.team.id, event="scan", data=scan(i + 1, qr_code_id=4242))
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    await until(lambda: len(receiver.at("/scans")) == 20, what="20 scans")
    await until(lambda: len(receiver.at("/first")) >= 1, what="first_scan")
    assert count(live, Event, kit.team.id, name="first_scan") == 1
    assert sum(len(r.deliveries) for r in results) == 21  # 20 scans + exactly one first_scan
    await anyio.sleep(0.3)
    (first,) = receiver.at("/first")
    assert (
        json.loads(first.body)["event"] == "first_scan"
        and json.loads(first.body)["data"]["qr_code_id"] == 4242
    )
    assert first.verified
    # A later scan of another QR code is first again; of the same one it is not.
    live.service.emit_event(team_id=kit.team.id, event="scan", data=scan(99, qr_code_id=4242))
    live.service.emit_event(team_id=kit.team.id, event="scan", data=scan(100, qr_code_id=4343))
    await until(lambda: len(receiver.at("/first")) == 2 and len(receiver.at("/scans")) == 22)
    assert [d.event for d in log_of(live, kit, firsts.id)] == ["first_scan", "first_scan"]
    assert len(log_of(live, kit, scans.id)) == 22


async def test_500_500_200_succeeds_on_the_third_attempt_with_every_attempt_logged(
    live: App, receiver: Receiver
):
    kit = make_team(live, "flaky")
    w = hook(kit, receiver, "/flaky", ["scan"])
    receiver.expect(
        "/flaky", Reply(500, body=b"boom 1"), Reply(500, body=b"boom 2"), Reply(200, body=b"thanks")
    )
    live.service.emit_event(team_id=kit.team.id, event="scan", data=scan())
    (d,) = await until(lambda: [d for d in log_of(live, kit, w.id) if d.state == "succeeded"], what="success")
    assert [a.number for a in d.attempts] == [1, 2, 3]
    assert [a.status_code for a in d.attempts] == [500, 500, 200]
    assert [a.response_body for a in d.attempts] == ["boom 1", "boom 2", "thanks"]
    assert d.attempts[0].error and "500" in d.attempts[0].error and d.attempts[2].error is None
    assert d.attempts[0].next_retry_at is not None and d.attempts[2].next_retry_at is None
    assert all(a.duration_ms >= 0 for a in d.attempts)
    ids = {r.headers["x-webhook-delivery"] for r in receiver.at("/flaky")}
    assert ids == {str(d.id)}  # the same delivery id on every retry
    assert d.next_attempt_at is None


async def test_always_500_fails_after_four_attempts_never_early(live: App, receiver: Receiver):
    kit = make_team(live, "down")
    w = hook(kit, receiver, "/down", ["scan"])
    receiver.expect("/down", *[Reply(500)] * 10)
    live.service.emit_event(team_id=kit.team.id, event="scan", data=scan())
    (d,) = await until(lambda: [d for d in log_of(live, kit, w.id) if d.state == "failed"], what="failed")
    assert len(d.attempts) == 4 and d.next_attempt_at is None
    arrivals = [r.at for r in receiver.at("/down")]
    assert len(arrivals) == 4
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    for gap, wait in zip(gaps, SCHEDULE, strict=True):
        assert gap >= wait, f"attempt came early: {gaps} vs schedule {SCHEDULE}"
    await anyio.sleep(1.0)
    assert len(receiver.at("/down")) == 4  # nothing after failed


async def test_retrying_state_is_visible_between_attempts(db_url: str, receiver: Receiver):
    app = App.build(fast_settings(db_url, retry_schedule=(3.0,)))
    app.prepare()
    kit = make_team(app, "retrying")
    w = hook(kit, receiver, "/later", ["scan"])
    receiver.expect("/later", Reply(503))
    async with app.lifespan(dispatcher=True):
        app.service.emit_event(team_id=kit.team.id, event="scan", data=scan())
        (d,) = await until(lambda: [d for d in log_of(app, kit, w.id) if d.attempts], what="first attempt")
        assert d.state == "retrying" and d.next_attempt_at is not None
        assert d.attempts[0].next_retry_at == d.next_attempt_at


def test_claim_and_save_keep_times_in_the_column_format_and_read_back_rotated_secrets(
    db_url: str, receiver: Receiver
):
    """The dispatcher's claim and save bypass SQLAlchemy's binding; the times they write must be
    what the ORM writes (on SQLite, one text format: mixed formats sort wrongly), and the claim
    must read back a rotated-out secret with its expiry."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import text

    from justscan_mcp.store import AttemptResult

    app = App.build(fast_settings(db_url))
    app.prepare()
    kit = make_team(app, "formats")
    w = hook(kit, receiver, "/formats", ["scan"])
    old = w.secret
    app.service.rotate_secret(principal=kit.principal(), webhook_id=w.id)
    (did,) = app.service.emit_event(team_id=kit.team.id, event="scan", data=scan()).deliveries
    now = datetime.now(UTC)
    # Only this webhook: the PostgreSQL database is shared by the session, and an earlier module's
    # backlog (the black-hole test leaves 200 due) comes first in the claim's order.
    (job,) = [
        c
        for c in app.store.claim_due(claim="c1", now=now, lease_seconds=30, limit=100, only=[w.id])
        if c.delivery_id == did
    ]
    assert job.signing_secrets[1] == old and len(job.signing_secrets) == 2
    retry_at = now + timedelta(seconds=5)
    app.store.complete(
        worker="w1",
        results=[
            AttemptResult(
                delivery_id=did,
                claim=job.claim,
                number=1,
                started_at=now,
                duration_ms=3,
                status_code=500,
                response_body="no",
                error="receiver answered HTTP 500",
                state="retrying",
                next_attempt_at=retry_at,
            )
        ],
        now=now,
    )
    d, attempts = app.store.get_delivery(team_id=kit.team.id, delivery_id=did)
    assert d.state == "retrying" and d.next_attempt_at == retry_at and d.updated_at == now
    assert attempts[0].started_at == now and attempts[0].next_retry_at == retry_at

    def claims(at: datetime) -> list[int]:  # this test's delivery only: the database is shared
        got = app.store.claim_due(claim="c2", now=at, lease_seconds=0, limit=1000)
        return [c.delivery_id for c in got if c.delivery_id == did]

    assert claims(now) == []
    assert claims(retry_at + timedelta(microseconds=1)) == [did]
    if app.store.backend == "sqlite":
        with app.store.engine.connect() as conn:
            stored = conn.execute(
                text("SELECT next_attempt_at, lease_expires_at, created_at FROM deliveries WHERE id = :i"),
                {"i": did},
            ).one()
        assert all(len(v) == len("2026-01-01 00:00:00.000000") and "+" not in v for v in stored), stored
    app.close()


async def test_timeout_refused_connection_and_redirect_are_failures(live: App, receiver: Receiver):
    kit = make_team(live, "fail")
    slow = hook(kit, receiver, "/slow", ["scan"])
    moved = hook(kit, receiver, "/moved", ["scan"])
    receiver.expect("/slow", *[Reply(200, delay=1.5)] * 4)
    receiver.expect("/moved", *[Reply(301, headers={"Location": "https://example.com/elsewhere"})] * 4)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    refused = live.service.create_webhook(
        principal=kit.principal(), url=f"http://127.0.0.1:{closed_port}/nobody", events=["scan"]
    )
    live.service.emit_event(team_id=kit.team.id, event="scan", data=scan())

    def first_attempt(webhook_id):
        rows = log_of(live, kit, webhook_id)
        return rows[0].attempts[0] if rows and rows[0].attempts else None

    a = await until(lambda: first_attempt(slow.id), what="timeout attempt")
    assert a.status_code is None and "timed out" in a.error
    a = await until(lambda: first_attempt(moved.id), what="redirect attempt")
    assert a.status_code == 301 and "not followed" in a.error
    a = await until(lambda: first_attempt(refused.id), what="refused attempt")
    assert a.status_code is None and "connection failed" in a.error
    for webhook_id in (slow.id, moved.id, refused.id):
        (d,) = await until(
            lambda w=webhook_id: [d for d in log_of(live, kit, w) if d.state == "failed"],
            what=f"webhook {webhook_id}'s delivery to fail",
        )
        assert [a.number for a in d.attempts] == [1, 2, 3, 4] and d.next_attempt_at is None
    assert not any("elsewhere" in r.path for r in receiver.received)


async def test_large_response_body_is_stored_cut_at_16_kib(live: App, receiver: Receiver):
    kit = make_team(live, "big")
    w = hook(kit, receiver, "/big", ["scan"])
    receiver.expect("/big", Reply(200, body=b"x" * (100 * 1024)))
    live.service.emit_event(team_id=kit.team.id, event="scan", data=scan())
    (d,) = await until(lambda: [d for d in log_of(live, kit, w.id) if d.state == "succeeded"])
    assert len(d.attempts[0].response_body) == 16 * 1024


async def test_non_ascii_payload_verifies(live: App, receiver: Receiver):
    kit = make_team(live, "utf8")
    w = hook(kit, receiver, "/utf8", ["form_submit"])
    data = {
        "landing_page_id": 5,
        "title": "Grüße aus Köln 📱",
        "slug": "köln",
        "recipient_email": None,
        "fields": {"név": "Zoë ✓"},
    }
    live.service.emit_event(team_id=kit.team.id, event="form_submit", data=data)
    await until(lambda: [d for d in log_of(live, kit, w.id) if d.state == "succeeded"])
    (got,) = receiver.at("/utf8")
    assert got.verified and "Grüße aus Köln 📱".encode() in got.body
    assert json.loads(got.body)["data"]["fields"] == {"név": "Zoë ✓"}


async def test_private_address_is_refused_again_at_delivery_time(db_url: str, receiver: Receiver):
    creator = App.build(fast_settings(db_url))
    creator.prepare()
    kit = make_team(creator, "ssrf")
    w = hook(kit, receiver, "/internal", ["scan"])
    by_name = creator.service.create_webhook(
        principal=kit.principal(), url=f"http://localhost:{receiver.port}/by-name", events=["scan"]
    )
    strict = App.build(fast_settings(db_url, allow_private_targets=False))
    async with strict.lifespan(dispatcher=True):
        creator.service.emit_event(team_id=kit.team.id, event="scan", data=scan())
        for webhook_id in (w.id, by_name.id):
            rows = await until(lambda wid=webhook_id: [d for d in log_of(creator, kit, wid) if d.attempts])
            assert "refused" in rows[0].attempts[0].error
    assert receiver.at("/internal") == [] and receiver.at("/by-name") == []


BAD_EMITS = [
    ("scan", {"scan_id": 1}, "data.qr_code_id", "required"),
    ("scan", {"qr_code_id": "7", "scan_id": 1}, "data.qr_code_id", "integer"),
    ("scan", {"qr_code_id": 7, "scan_id": 1, "device": 5}, "data.device", "string"),
    ("scan", {"qr_code_id": 7, "scan_id": 1, "colour": "red"}, "data.colour", "not a field"),
    ("form_submit", {"landing_page_id": 1, "fields": "a=b"}, "data.fields", "object"),
    ("file_download", {"shared_file_id": 1, "qr_code_id": 2}, "data.scan_id", "required"),
    ("scan2", {"qr_code_id": 7, "scan_id": 1}, "event", "not an event"),
    ("first_scan", {"qr_code_id": 7, "scan_id": 1}, "event", "cannot be emitted"),
    ("test", {"test": True, "webhook_id": 1}, "event", "cannot be emitted"),
    ("scan", [1, 2], "data", "JSON object"),
    ("scan", "qr=1", "data", "JSON object"),
]


@pytest.mark.parametrize("event,data,field,words", BAD_EMITS)
async def test_bad_events_are_refused_naming_the_field_and_nothing_is_recorded(
    live: App, receiver: Receiver, event, data, field, words
):
    kit = make_team(live, "bad")
    hook(kit, receiver, "/any", ["scan", "form_submit", "file_download", "first_scan"])
    with pytest.raises(InvalidInput) as err:
        live.service.emit_event(team_id=kit.team.id, event=event, data=data)
    assert err.value.field == field and words in err.value.reason
    assert count(live, Event, kit.team.id) == 0
    assert count(live, Delivery, kit.team.id) == 0
    await anyio.sleep(0.2)
    assert receiver.at("/any") == []


async def test_unknown_team_is_refused(live: App):
    with pytest.raises(NotFound) as err:
        live.service.emit_event(team_id=10**12, event="scan", data=scan())
    assert err.value.field == "team"


def test_the_claim_walks_the_open_index_in_order_even_before_statistics_catch_up(pg_base_url, tmp_path):
    """A burst fills the outbox faster than autovacuum analyzes it. With statistics from when the
    table was empty the planner guessed a handful of due rows and chose a bitmap scan and a sort of
    the whole backlog: 9.4 ms a claim with 10,000 queued instead of 0.1, growing with the queue,
    until the next ANALYZE. The claim's plan must not depend on statistics: the statements it
    sends are replayed here under EXPLAIN on a table that was never analyzed."""
    import psycopg

    from justscan_mcp.store import normalise_url
    from tests.conftest import missing, own_pg_database

    if pg_base_url is None:
        missing("JUSTSCAN_TEST_DATABASE_URL", "this test runs on PostgreSQL; set it")
    with own_pg_database(pg_base_url, "justscan_plan") as url:
        dsn = normalise_url(url).replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("ALTER TABLE deliveries SET (autovacuum_enabled = false)")
        app = App.build(fast_settings(url))
        app.prepare()
        try:
            kit = make_team(app, "plan")
            app.service.create_webhook(
                principal=kit.principal(), url="http://127.0.0.1:9/plan", events=["scan"]
            )
            for start in range(0, 10_000, 1000):
                app.service.emit_events_as(
                    principal=kit.principal(),
                    events=[{"event": "scan", "data": scan(i)} for i in range(start, start + 1000)],
                )
            sent: list[tuple[str, object]] = []
            real = psycopg.Cursor.execute

            def spy(self, query, params=None, **kw):
                sent.append((str(query), params))
                return real(self, query, params, **kw)

            psycopg.Cursor.execute = spy  # type: ignore[method-assign]
            try:
                from datetime import UTC, datetime

                claims = app.store.claim_due(
                    claim="plan-test", now=datetime.now(UTC), lease_seconds=30, limit=16
                )
            finally:
                psycopg.Cursor.execute = real  # type: ignore[method-assign]
            assert len(claims) == 16
            update = next(i for i, (q, _) in enumerate(sent) if "UPDATE deliveries SET lease_owner" in q)
            with psycopg.connect(dsn) as conn:
                for query, params in sent[:update]:
                    conn.execute(query, params)  # what the claim sets up in its transaction
                query, params = sent[update]
                plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + query, params))
                conn.rollback()
        finally:
            app.close()
    assert "ix_deliveries_open" in plan and "Sort" not in plan, plan

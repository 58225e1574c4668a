"""The round trips of PostgreSQL's hot transactions, counted on the wire.

Each transaction of ingest (the group commit and the batch endpoint), of the claim and of a
result's save says in its docstring how many round trips it makes; under load every round trip
waits for a CPU beside the sends and the receiver, so the count is what paces them. A forwarder
between the app and PostgreSQL counts *turns*: the times the client speaks again after the server
answered. psycopg's pipeline mode hides some turns in calls that look harmless (a fetch inside the
block, `commit()`, the implicit BEGIN), so these numbers are only believed when counted here.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from justscan_mcp.app import App
from justscan_mcp.config import Settings
from justscan_mcp.errors import JustScanError
from justscan_mcp.service.events import IngestRequest
from justscan_mcp.store import db as store_db
from justscan_mcp.store.outbox import AttemptResult, NewEvent
from tests.conftest import free_port, make_team, missing, own_pg_database, stub_resolver


class TurnCounter:
    """A TCP forwarder that counts, over all its connections, each time the client sends after
    the server has sent (or first sends): one round trip each."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.turns = 0
        self._server_spoke: dict[int, bool] = {}
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._srv.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = id(client)
            self._server_spoke[key] = True
            threading.Thread(target=self._pipe, args=(client, upstream, key, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, key, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, key: int, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                # Counted before forwarding: the answer cannot arrive before its question is counted.
                with self._lock:
                    if from_client and self._server_spoke[key]:
                        self.turns += 1
                    self._server_spoke[key] = not from_client
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def count(self, work) -> int:
        before = self.turns
        work()
        return self.turns - before


@pytest.fixture(scope="module")
def wired(pg_base_url: str | None) -> Iterator[tuple[App, TurnCounter]]:
    if pg_base_url is None:
        missing("JUSTSCAN_TEST_DATABASE_URL", "this test runs on PostgreSQL; set it")
    with own_pg_database(pg_base_url, "justscan_trips") as url:
        real = make_url(url)
        counter = TurnCounter((real.host or "127.0.0.1", real.port or 5432))
        via = real.set(host="127.0.0.1", port=counter.port).render_as_string(hide_password=False)
        app = App.build(Settings(database_url=via), resolver=stub_resolver)
        app.prepare()
        try:
            yield app, counter
        finally:
            app.close()
            counter.close()


@pytest.fixture(autouse=True)
def no_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's liveness ping (after an idle spell) is a round trip of its own, not the
    transaction's."""
    monkeypatch.setattr(store_db, "PING_AFTER_IDLE", 3600.0)


def scans(key: str, first: int, n: int) -> list[IngestRequest]:
    return [
        IngestRequest(raw_key=key, event="scan", data={"qr_code_id": first + i % 3, "scan_id": first + i})
        for i in range(n)
    ]


def test_the_group_commit_of_single_events_is_four_round_trips(wired):
    """BEGIN; the keys, their webhooks and the event ids; the delivery ids, the events and the
    first_scans claim; the first_scan events, the deliveries, NOTIFY and COMMIT. Before, a fetch
    inside each pipeline and a separate COMMIT made it eight."""
    app, counter = wired
    kit = make_team(app, "trips")
    app.service.create_webhook(
        principal=kit.principal(), url="https://hooks.example.test/t", events=["scan", "first_scan"]
    )
    key = kit.key(scopes=["events:write"]).key
    app.service.ingest(scans(key, 1, 2))  # the pool's connection is open and warm

    got: list = []
    trips = counter.count(lambda: got.extend(app.service.ingest(scans(key, 100, 10))))
    assert all(not isinstance(r, JustScanError) and len(r.deliveries) >= 1 for r in got), got
    firsts = sum(len(r.deliveries) == 2 for r in got)
    assert firsts == 3  # three new QR codes: each one's first scan also made a first_scan delivery
    assert trips == 4, trips


def test_a_batch_is_four_round_trips(wired):
    """BEGIN; the webhooks and the event ids; the delivery ids, the events and the first_scans
    claim; the first_scan events, the deliveries, NOTIFY and COMMIT (seven before)."""
    app, counter = wired
    kit = make_team(app, "trips")
    app.service.create_webhook(
        principal=kit.principal(), url="https://hooks.example.test/b", events=["scan", "first_scan"]
    )
    now = datetime.now(UTC)
    items = [
        NewEvent(team_id=kit.team.id, event="scan", payload=b'{"n": %d}' % i, first_scan=(500 + i % 2, b"{}"))
        for i in range(20)
    ]
    app.store.record_events(items=items[:1], now=now)
    got: list = []
    trips = counter.count(lambda: got.extend(app.store.record_events(items=items, now=now)))
    assert len(got) == 20 and sum(len(d) for _, d in got) == 21  # one more first_scan: code 501
    assert trips == 4, trips


def test_a_claim_is_two_round_trips_and_a_save_three(wired):
    """The claim: BEGIN; the settings, the lease and COMMIT (three before: `commit()` inside the
    pipeline synced and waited, and the block's exit synced and waited again). The save: BEGIN;
    the lock; the writes and COMMIT (four before)."""
    app, counter = wired
    kit = make_team(app, "trips")
    hook = app.service.create_webhook(
        principal=kit.principal(), url="https://hooks.example.test/c", events=["scan"]
    )
    key = kit.key(scopes=["events:write"]).key
    app.service.ingest(scans(key, 900, 5))
    now = datetime.now(UTC) + timedelta(seconds=1)
    claims: list = []
    trips = counter.count(
        lambda: claims.extend(
            app.store.claim_due(claim="trips", now=now, lease_seconds=30, limit=100, only=[hook.id])
        )
    )
    assert len(claims) == 5 and trips == 2, (len(claims), trips)

    results = [
        AttemptResult(
            delivery_id=c.delivery_id,
            claim=c.claim,
            number=1,
            started_at=now,
            duration_ms=3,
            status_code=200,
            response_body="ok",
            error=None,
            state="delivered",
            next_attempt_at=None,
            webhook_id=hook.id,
        )
        for c in claims
    ]
    saved: list = []
    trips = counter.count(lambda: saved.extend(app.store.complete(worker="w", results=results, now=now)))
    assert sorted(saved) == sorted(c.delivery_id for c in claims) and trips == 3, (saved, trips)


def test_a_statement_refused_beside_the_commit_records_nothing_and_frees_the_connection(
    wired, monkeypatch: pytest.MonkeyPatch
):
    """The COMMIT rides in the last pipeline as a statement: when a statement before it fails,
    the server skips it, the transaction is rolled back, none of the batch is stored, and the
    pooled connection serves the next transaction."""
    from justscan_mcp.store.outbox import Outbox

    app, _ = wired
    kit = make_team(app, "trips")
    app.service.create_webhook(principal=kit.principal(), url="https://hooks.example.test/f", events=["scan"])
    real = Outbox._insert_deliveries

    def refused(self, cur, rows, stamp, ids):
        out = real(self, cur, rows, stamp, ids)
        cur.execute("SELECT 1 / 0")  # in the same pipeline as the COMMIT
        return out

    monkeypatch.setattr(Outbox, "_insert_deliveries", refused)
    item = NewEvent(team_id=kit.team.id, event="scan", payload=b"{}", first_scan=None)
    with pytest.raises(JustScanError):
        app.store.record_events(items=[item] * 3, now=datetime.now(UTC))
    monkeypatch.setattr(Outbox, "_insert_deliveries", real)
    with app.store.engine.connect() as c:
        stored = c.execute(text(f"SELECT count(*) FROM events WHERE team_id = {kit.team.id}")).scalar()
    assert stored == 0
    ((event_id, deliveries),) = app.store.record_events(items=[item], now=datetime.now(UTC))
    assert event_id and len(deliveries) == 1

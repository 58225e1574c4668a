"""Ingest at campaign rates: the batch endpoint (mixed batches, limits, Idempotency-Key), the
group commit of single-event requests (shared transactions, back-pressure, the same answers as
before), first_scan derived once under concurrent batched ingest on both databases, and a SIGKILL
in the middle of a stream: every 202 was committed with its deliveries."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from justscan_mcp.app import App
from justscan_mcp.config import Settings
from justscan_mcp.errors import Overloaded
from justscan_mcp.groupcommit import GroupCommit
from tests.conftest import (
    TeamKit,
    child_env,
    make_team,
    own_database,
    spawn_server,
    stub_resolver,
    wait_for,
)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This module's own database: its thousands of pending deliveries would otherwise be worked
    through by other modules' dispatchers on the shared test database (and crowd its sweeps)."""
    with own_database(request, request.param, tmp_path_factory.mktemp("ingest"), "justscan_ingest") as url:
        yield url


@pytest.fixture
def team(app: App, http_server) -> tuple[TeamKit, str, int]:
    """A team with one webhook on scan and first_scan, and an events:write key."""
    kit = make_team(app, "ingest")
    hook = app.service.create_webhook(
        principal=kit.principal(),
        url="https://hooks.example.test/i",
        events=["scan", "first_scan", "form_submit"],
    )
    key = kit.key(scopes=["events:write"]).key
    return kit, key, hook.id


def stored_events(app: App, team_id: int) -> list[tuple[int, str]]:
    with app.store.engine.connect() as c:
        return [
            tuple(r)
            for r in c.execute(text(f"SELECT id, name FROM events WHERE team_id = {team_id} ORDER BY id"))
        ]


def deliveries_of(app: App, event_ids: list[int]) -> dict[int, int]:
    if not event_ids:
        return {}
    with app.store.engine.connect() as c:
        rows = c.execute(
            text(
                f"SELECT event_id, count(*) FROM deliveries WHERE event_id IN ({','.join(map(str, event_ids))}) GROUP BY event_id"
            )
        )
        return {e: n for e, n in rows}


def scan(qr: int, n: int) -> dict:
    return {"event": "scan", "data": {"qr_code_id": qr, "scan_id": n}}


# --- the batch endpoint ---------------------------------------------------------------------


def test_a_mixed_batch_records_the_valid_events_and_names_each_refusal(app: App, http_server, team):
    kit, key, _hook = team
    batch = [
        scan(7, 1),
        {"event": "scan", "data": {"qr_code_id": 7}},  # scan_id missing
        {"event": "poster_hung", "data": {}},  # unknown event
        {"event": "first_scan", "data": {"qr_code_id": 7, "scan_id": 2}},  # derived, not emittable
        scan(7, 3),  # the same QR code again: no second first_scan
        {"event": "scan", "data": {"qr_code_id": 8, "scan_id": 4}, "extra": 1},
        "not an object",
        {"event": "form_submit", "data": {"landing_page_id": 3, "fields": {"email": "a@b.c"}}},
        {"event": "scan", "data": {"qr_code_id": 0, "scan_id": 5}},  # id out of range
    ]
    r = httpx.post(
        f"{http_server.base}/api/v1/events/batch",
        json={"events": batch},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["recorded"], body["failed"]) == (3, 6)
    results = body["results"]
    assert [x["index"] for x in results] == list(range(len(batch)))
    ok = {x["index"]: x for x in results if x["error"] is None}
    assert set(ok) == {0, 4, 7}
    assert len(ok[0]["deliveries"]) == 2  # the scan's and its first_scan's
    assert len(ok[4]["deliveries"]) == 1 and len(ok[7]["deliveries"]) == 1
    refused = {x["index"]: (x["error"], x["field"]) for x in results if x["error"] is not None}
    assert refused == {
        1: ("invalid_input", "events[1].data.scan_id"),
        2: ("invalid_input", "events[2].event"),
        3: ("invalid_input", "events[3].event"),
        5: ("invalid_input", "events[5].extra"),
        6: ("invalid_input", "events[6]"),
        8: ("invalid_input", "events[8].data.qr_code_id"),
    }
    # The message names the field once, as a single event's 422 does.
    assert all(x["message"].startswith(x["field"] + ": ") for x in results if x["error"])
    assert results[1]["message"] == "events[1].data.scan_id: is required"
    names = [name for _, name in stored_events(app, kit.team.id)]
    assert sorted(names) == ["first_scan", "form_submit", "scan", "scan"]
    ids = [e for e, _ in stored_events(app, kit.team.id)]
    assert deliveries_of(app, ids) == dict.fromkeys(ids, 1)
    assert {ok[i]["event_id"] for i in ok} <= set(ids)


def test_a_batch_takes_1_to_1000_events_and_its_body_limit(app: App, http_server, team):
    kit, key, _ = team
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{http_server.base}/api/v1/events/batch"
    full = httpx.post(
        url, json={"events": [scan(1000 + i, i + 1) for i in range(1000)]}, headers=headers, timeout=60
    )
    assert full.status_code == 202 and full.json()["recorded"] == 1000
    before = len(stored_events(app, kit.team.id))
    for events in ([scan(5000 + i, i + 1) for i in range(1001)], []):
        r = httpx.post(url, json={"events": events}, headers=headers, timeout=60)
        assert r.status_code == 422 and r.json()["field"] == "events", r.text
    big = httpx.post(url, json={"events": [scan(1, 1) | {"pad": "x" * 2_000_000}]}, headers=headers)
    assert big.status_code == 413
    wrong = httpx.post(url, json={"events": [scan(1, 1)]}, headers={"Authorization": f"Bearer {kit.rw.key}"})
    assert wrong.status_code == 403 and "events:write" in wrong.json()["message"]
    assert len(stored_events(app, kit.team.id)) == before  # nothing of the refused requests


def test_an_idempotency_key_covers_the_whole_batch(app: App, http_server, team):
    kit, key, _ = team
    url = f"{http_server.base}/api/v1/events/batch"
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "campaign-7-batch-1"}
    body = {"events": [scan(70, 1), scan(71, 2), {"event": "nope", "data": {}}]}
    first = httpx.post(url, json=body, headers=headers)
    assert first.status_code == 202 and first.json()["recorded"] == 2
    again = httpx.post(url, json=body, headers=headers)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    other = httpx.post(url, json={"events": [scan(72, 3)]}, headers=headers)
    assert other.status_code == 409 and other.json()["field"] == "Idempotency-Key"
    assert len(stored_events(app, kit.team.id)) == 4  # two scans, two first_scans, once


# --- the group commit -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_submissions_share_a_transaction_and_idle_ones_do_not_wait():
    sizes: list[int] = []
    gate = threading.Event()

    def write(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if len(sizes) == 1:
            gate.wait(10)  # the first batch is slow: the next 49 callers arrive meanwhile
        return [i * 10 for i in items]

    commit: GroupCommit[int, int] = GroupCommit(write)
    first = asyncio.create_task(commit.submit(0))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(commit.submit(i)) for i in range(1, 50)]
    while len(sizes) < 1:
        await asyncio.sleep(0.001)
    gate.set()
    assert await first == 0 and await asyncio.gather(*rest) == [i * 10 for i in range(1, 50)]
    assert sizes == [1, 49]
    assert await commit.submit(7) == 70 and sizes == [1, 49, 1]


@pytest.mark.anyio
async def test_past_its_limit_the_group_commit_refuses_with_overloaded_not_an_unbounded_queue():
    gate = threading.Event()

    def write(items: list[int]) -> list[int]:
        gate.wait(10)
        return items

    commit: GroupCommit[int, int] = GroupCommit(write, max_waiting=3)
    busy = asyncio.create_task(commit.submit(0))
    await asyncio.sleep(0.01)
    waiting = [asyncio.create_task(commit.submit(i)) for i in range(1, 4)]
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await commit.submit(99)
    gate.set()
    assert await busy == 0 and await asyncio.gather(*waiting) == [1, 2, 3]


@pytest.mark.anyio
async def test_a_batch_that_fails_fails_each_of_its_callers_and_the_next_batch_still_runs():
    calls = []

    def write(items: list[int]) -> list[int]:
        calls.append(items)
        if 13 in items:
            raise RuntimeError("database said no")
        return items

    commit: GroupCommit[int, int] = GroupCommit(write)
    with pytest.raises(RuntimeError, match="said no"):
        await commit.submit(13)
    assert await commit.submit(14) == 14


def test_single_events_answer_as_before_through_the_fast_path(app: App, http_server, team):
    kit, key, _ = team
    url = f"{http_server.base}/api/v1/events"
    cases = [
        ({}, scan(1, 1), 401, None),
        ({"Authorization": "Bearer jsi_nope"}, scan(1, 1), 401, None),
        ({"Authorization": f"Bearer {kit.rw.key}"}, scan(1, 1), 403, None),  # no events:write
        ({"Authorization": f"Bearer {kit.rw.key}"}, {"event": 1}, 403, None),  # the key before the body
        ({"Authorization": f"Bearer {key}"}, {"event": "scan"}, 422, "data"),
        (
            {"Authorization": f"Bearer {key}"},
            {"event": "scan", "data": {"qr_code_id": 1}},
            422,
            "data.scan_id",
        ),
        ({"Authorization": f"Bearer {key}"}, {"event": "nope", "data": {}}, 422, "event"),
        ({"Authorization": f"Bearer {key}"}, {"event": "scan", "data": {}, "x": 1}, 422, "x"),
    ]
    for headers, body, status, field in cases:
        r = httpx.post(url, json=body, headers=headers)
        assert r.status_code == status, (body, r.text)
        assert r.json()["field"] == field, r.text
    bad = httpx.post(url, content=b"{not json", headers={"Authorization": f"Bearer {key}"})
    assert bad.status_code == 422 and bad.json()["field"] == "body"
    assert stored_events(app, kit.team.id) == []
    ok = httpx.post(url, json=scan(9, 1), headers={"Authorization": f"Bearer {key}"})
    assert (
        ok.status_code == 202
        and set(ok.json()) == {"event_id", "deliveries"}
        and len(ok.json()["deliveries"]) == 2
    )


@pytest.mark.anyio
async def test_first_scan_is_derived_once_under_concurrent_batched_ingest(app: App, http_server, team):
    """20 clients post scans of the same five QR codes at once, single events through the group
    commit and batches with repeats inside them: one first_scan per code, on both databases."""
    kit, key, _ = team
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=http_server.base, headers=headers, timeout=60) as client:

        async def single(n: int) -> httpx.Response:
            return await client.post("/api/v1/events", json=scan(300 + n % 5, n + 1))

        async def batch(n: int) -> httpx.Response:
            return await client.post(
                "/api/v1/events/batch",
                json={"events": [scan(300 + (n + j) % 5, 1000 + n * 10 + j) for j in range(10)]},
            )

        answers = await asyncio.gather(*[single(n) for n in range(100)], *[batch(n) for n in range(20)])
    assert all(r.status_code == 202 for r in answers), {r.status_code for r in answers}
    names = [name for _, name in stored_events(app, kit.team.id)]
    assert names.count("scan") == 100 + 200 and names.count("first_scan") == 5


# --- a crash in the middle of a stream --------------------------------------------------------


@pytest.mark.slow
def test_every_202_survives_a_sigkill_in_the_middle_of_a_stream(db_url: str, tmp_path: Path):
    app = App.build(Settings(database_url=db_url), resolver=stub_resolver)
    app.prepare()
    kit = make_team(app, "sigkill-ingest")
    app.service.create_webhook(
        principal=kit.principal(), url="https://hooks.example.test/k", events=["scan", "first_scan"]
    )
    key = kit.key(scopes=["events:write"]).key
    accepted: list[dict] = []
    stop = threading.Event()
    with spawn_server(child_env(db_url), tmp_path / "server.log", "--no-dispatcher") as server:

        def client(c: int) -> None:
            with httpx.Client(
                base_url=server.base, headers={"Authorization": f"Bearer {key}"}, timeout=5
            ) as http:
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        r = http.post("/api/v1/events", json=scan(c * 1000 + n % 50, c * 100_000 + n))
                    except httpx.HTTPError:
                        return  # the server is gone
                    if r.status_code == 202:
                        accepted.append(r.json())

        threads = [threading.Thread(target=client, args=(c,)) for c in range(20)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(accepted) >= 400, timeout=60, what="a stream of accepted events")
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait()
        finally:
            stop.set()
            for t in threads:
                t.join(10)
    ids = [a["event_id"] for a in accepted]
    stored = dict(stored_events(app, kit.team.id))
    missing = [i for i in ids if i not in stored]
    assert not missing, f"{len(missing)} events answered 202 are not in the database"
    counts = deliveries_of(app, list(stored))
    for a in accepted:
        for did in a["deliveries"]:
            assert did  # every delivery id answered exists below
        assert counts.get(a["event_id"]) == 1
    with app.store.engine.connect() as c:
        answered = [d for a in accepted for d in a["deliveries"]]
        found = c.execute(
            text(f"SELECT count(*) FROM deliveries WHERE id IN ({','.join(map(str, answered))})")
        ).scalar()
    assert found == len(answered)
    print(f"{len(accepted)} accepted before the SIGKILL; all stored with their {len(answered)} deliveries")
    app.close()


def test_the_envelope_is_byte_for_byte_what_json_dumps_made_before_it_was_sped_up():
    """envelope() writes its JSON with pydantic's serializer (issue 17); receivers keep getting
    the bytes the stdlib made: the same separators, key order, escapes, floats and non-ASCII."""
    import json
    from datetime import UTC, datetime, timedelta, timezone

    from justscan_mcp.events import EXAMPLE_DATA, envelope, validate_emit

    def before(event: str, data, timestamp: datetime) -> bytes:
        doc = {
            "event": event,
            "timestamp": timestamp.isoformat(timespec="seconds"),
            "data": data.model_dump(mode="json"),
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    odd_fields = {
        "nan": float("nan"),
        "inf": float("-inf"),
        "big": 1e16,
        "tiny": 5e-324,
        "tenth": 0.1,
        "int": 2**62,
        "text": 'quote " backslash \\ slash / tab \t nul-ish \x01 line\u2028sep é 漢 😀',
        "nested": {"list": [1, "two", None, True, {"deep": 1.5}]},
    }
    cases = [
        (event, dict(data)) for event, data in EXAMPLE_DATA.items() if event not in ("first_scan", "test")
    ]
    cases.append(("form_submit", {**EXAMPLE_DATA["form_submit"], "fields": odd_fields}))
    cases.append(("scan", {"qr_code_id": 1, "scan_id": 2, "device": "Ünïcödé ✓", "utm_source": 'a"b'}))
    times = [datetime(2026, 11, 30, 0, 0, 1, 999999, tzinfo=UTC), datetime.now(timezone(timedelta(hours=5)))]
    for event, data in cases:
        model = validate_emit(event, data)
        for at in times:
            assert envelope(event, model, at) == before(event, model, at), (event, data)


def test_sqlite_writers_of_one_process_queue_and_a_failed_one_frees_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The in-process queue of SQLite write transactions (issue 17): writers from many threads
    all get through, one that raises lets the next in at once, and one that cannot get in
    within the wait is StoreUnavailable, not a hang."""
    from justscan_mcp.errors import StoreUnavailable
    from justscan_mcp.store import Store
    from justscan_mcp.store import db as store_db

    store = Store.from_url(f"sqlite:///{tmp_path / 'q.db'}")
    store.create_schema()
    try:
        with pytest.raises(RuntimeError), store.session(write=True):
            raise RuntimeError("a writer that fails half-way")
        with store.session(write=True) as s:  # would wait forever if the failure kept the queue
            s.exec(text("UPDATE teams SET name = name"))

        done: list[int] = []

        def writer(n: int) -> None:
            for _ in range(20):
                with store.session(write=True) as s:
                    s.exec(text("CREATE TABLE IF NOT EXISTS q (n INTEGER)"))
                    s.exec(text("INSERT INTO q (n) VALUES (:n)").bindparams(n=n))
            done.append(n)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(done) == list(range(8))
        with store.session() as s:
            assert s.exec(text("SELECT count(*) FROM q")).one()[0] == 160

        monkeypatch.setattr(store_db, "SQLITE_WRITE_WAIT", 0.2)
        holding, release = threading.Event(), threading.Event()

        def hold() -> None:
            with store.session(write=True):
                holding.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        assert holding.wait(10)
        try:
            with pytest.raises(StoreUnavailable, match="locked"), store.session(write=True):
                pass
            with store.session() as s:  # readers do not queue
                assert s.exec(text("SELECT count(*) FROM q")).one()[0] == 160
        finally:
            release.set()
            holder.join(10)
    finally:
        store.close()

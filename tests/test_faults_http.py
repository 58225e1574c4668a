"""Faults at the HTTP front door, against a real `serve --transport http` process: odd input is an
answer (never a 500 in plain text), every body has a limit, loopback names work on any port, SSE
messages get the key checks of /mcp, and the operator's sign-in resists guessing and ends with the
password."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from mcp import MCPError
from sqlalchemy import func, select

from justscan_mcp.app import App
from justscan_mcp.models import Event
from tests.conftest import HttpServer, TeamKit, child_env, make_team, spawn_server, wait_for
from tests.test_dashboard import csrf_of
from tests.test_http import ACCEPT, INIT, post_init, sse

pytestmark = pytest.mark.anyio

ADMIN_PASSWORD = "operator password of the fault tests"


def events_of(app: App, team_id: int) -> int:
    with app.store.session() as s:
        return int(s.scalar(select(func.count()).select_from(Event).where(Event.team_id == team_id)))


def post_event(server: HttpServer, key: str, content: bytes) -> httpx.Response:
    return httpx.post(
        f"{server.base}/api/v1/events",
        content=content,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=10,
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ('{"qr_code_id": 9223372036854775808, "scan_id": 1}', "data.qr_code_id"),
        ('{"qr_code_id": 1, "scan_id": 0}', "data.scan_id"),
        ('{"qr_code_id": 1, "scan_id": -5}', "data.scan_id"),
        ('{"qr_code_id": 1, "scan_id": 1, "device": "\\ud800"}', "data.device"),
        ('{"qr_code_id": 1, "scan_id": 1, "utm_term": "ok \\udfff ok"}', "data.utm_term"),
    ],
    ids=["id-2**63", "id-0", "id-negative", "lone-high-surrogate", "lone-low-surrogate"],
)
def test_out_of_range_ids_and_lone_surrogates_are_422_naming_the_field(
    http_server: HttpServer, kit: TeamKit, data: str, field: str
):
    """Both were a plain-text 500 (the id overflowed BIGINT; the surrogate could not be encoded)."""
    key = kit.key(scopes=["events:write"]).key
    before = events_of(kit.app, kit.team.id)
    r = post_event(http_server, key, f'{{"event": "scan", "data": {data}}}'.encode())
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["field"] == field and field in r.json()["message"]
    assert events_of(kit.app, kit.team.id) == before


def test_a_lone_surrogate_in_form_fields_is_422(http_server: HttpServer, kit: TeamKit):
    key = kit.key(scopes=["events:write"]).key
    body = b'{"event": "form_submit", "data": {"landing_page_id": 3, "fields": {"name": "x\\ud83d"}}}'
    r = post_event(http_server, key, body)
    assert r.status_code == 422 and r.json()["field"] == "data.fields.name"
    assert events_of(kit.app, kit.team.id) == 0


async def test_an_unexpected_error_is_json_in_the_documented_shape(app: App, kit: TeamKit):
    """A bug must still answer in the error shape, not Starlette's plain-text 500."""
    from justscan_mcp.rest_api import build_rest_api

    api = build_rest_api(app)
    original = app.service.list_webhooks

    def broken(**kwargs):
        raise RuntimeError("a bug with a secret in its message: whsec_leak")

    app.service.list_webhooks = broken  # type: ignore[method-assign]
    try:
        transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            r = await c.get("/webhooks", headers={"Authorization": f"Bearer {kit.rw.key}"})
    finally:
        app.service.list_webhooks = original  # type: ignore[method-assign]
    assert r.status_code == 500
    assert r.json() == {"error": "internal", "message": r.json()["message"], "field": None}
    assert "whsec_leak" not in r.text


# --- body limits ------------------------------------------------------------------------------


def test_every_route_that_takes_a_body_has_a_limit(http_server: HttpServer, kit: TeamKit):
    big_form = {"csrf": "x", "api_key": "jsi_" + "a" * 70_000}
    c = httpx.Client(base_url=http_server.base, timeout=30)
    for path in ("/login", "/admin/login", "/logout", "/webhooks/new", "/webhooks/1"):
        r = c.post(path, data=big_form)
        assert r.status_code == 413, (path, r.status_code)
        assert r.json()["field"] == "body"
    huge = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x" * (2 * 1024 * 1024)}}
    auth = {"Authorization": f"Bearer {kit.rw.key}"}
    for path in ("/mcp", "/messages/?session_id=00000000000000000000000000000000", "/api/v1/events"):
        r = c.post(path, json=huge, headers=ACCEPT | auth)
        assert r.status_code == 413, (path, r.status_code)
    # Chunked, without a Content-Length: counted as it arrives.
    r = c.post("/login", content=iter([b"csrf=x&api_key=" + b"a" * 40_000] * 2))
    assert r.status_code == 413
    # Under the limit, a form still works as before (a wrong key is a 401 page, not a 413).
    ok = c.post("/login", data={"csrf": "x", "api_key": "jsi_short"})
    assert ok.status_code == 403  # the CSRF check, reached only because the body was read


# --- hosts and SSE ----------------------------------------------------------------------------


def test_loopback_names_are_accepted_on_any_port(http_server: HttpServer, kit: TeamKit):
    """An SSH tunnel or port-forward reaches the server as localhost:<its own port>."""
    auth = {"Authorization": f"Bearer {kit.rw.key}"}
    for host in ("localhost:9000", "127.0.0.1:1", "[::1]:65535", "localhost"):
        origin = f"http://{host}"
        r = post_init(http_server, auth | {"Host": host, "Origin": origin})
        assert r.status_code == 200, (host, r.status_code, r.text)
    assert post_init(http_server, auth | {"Host": "evil.example.com:9000"}).status_code == 421
    assert post_init(http_server, auth | {"Host": "localhost.evil.example.com"}).status_code == 421
    assert post_init(http_server, auth | {"Origin": "http://evil.example.com:9000"}).status_code == 403


async def test_sse_messages_get_the_key_checks_of_mcp(http_server: HttpServer, app: App):
    """Over SSE the HTTP layer only identifies a message's key: every request, not only tool
    calls, must re-check it (a revoked key must not keep using its open session)."""
    kit = make_team(app, "sse-checks")
    key = kit.key()
    async with sse(http_server, key.key) as c:
        # prompts/list: a request that is not a tool call (the SDK does not answer ping).
        assert [p.name for p in (await c.list_prompts()).prompts] == ["diagnose_webhook"]
        app.service.update_api_key(key_id=key.id, mcp_enabled=False)
        with pytest.raises(MCPError, match="MCP is not enabled"):
            await c.list_prompts()
        app.service.update_api_key(key_id=key.id, mcp_enabled=True)
        assert [p.name for p in (await c.list_prompts()).prompts] == ["diagnose_webhook"]
        app.service.revoke_api_key(key_id=key.id)
        with pytest.raises(MCPError, match="revoked"):
            await c.list_prompts()


async def test_another_keys_message_for_an_sse_session_is_refused(http_server: HttpServer, app: App):
    import anyio

    mine, theirs = make_team(app, "sse-own"), make_team(app, "sse-foreign")
    async with httpx.AsyncClient(base_url=http_server.base, timeout=10) as c:
        auth = {"Authorization": f"Bearer {mine.rw.key}"}
        async with c.stream("GET", "/sse", headers=auth) as stream:
            lines = stream.aiter_lines()  # kept open: leaving it would close the stream
            endpoint = ""
            with anyio.fail_after(10):
                while not endpoint.startswith("/messages"):
                    endpoint = (await anext(lines)).removeprefix("data: ")
            other = {"Authorization": f"Bearer {theirs.rw.key}", "Content-Type": "application/json"}
            refused = await c.post(endpoint, content=json.dumps(INIT), headers=other)
            assert refused.status_code == 404
            accepted = await c.post(endpoint, content=json.dumps(INIT), headers=auth | ACCEPT)
            assert accepted.status_code == 202


# --- the operator's sign-in -------------------------------------------------------------------


def operator_session(server: HttpServer, password: str = ADMIN_PASSWORD) -> httpx.Client:
    c = httpx.Client(base_url=server.base, follow_redirects=True, timeout=30)
    page = c.post("/admin/login", data={"csrf": csrf_of(c.get("/admin/login").text), "password": password})
    assert page.url.path == "/admin", page.text[:300]
    return c


def test_operator_sessions_end_when_the_password_changes_or_is_unset(db_url: str, tmp_path: Path):
    """Each server below is a new process on the same database (cookies do not depend on the
    port): an operator session lives only as long as the password it was opened with."""
    env = child_env(db_url, JUSTSCAN_ADMIN_PASSWORD=ADMIN_PASSWORD)
    changed = child_env(db_url, JUSTSCAN_ADMIN_PASSWORD="a different operator password")
    with spawn_server(env, tmp_path / "a.log", "--no-dispatcher") as server:
        browser = operator_session(server)
        assert browser.get(f"{server.base}/admin").url.path == "/admin"
    with spawn_server(env, tmp_path / "b.log", "--no-dispatcher") as server:
        assert browser.get(f"{server.base}/admin").url.path == "/admin"  # a restart alone keeps it
    with spawn_server(changed, tmp_path / "c.log", "--no-dispatcher") as server:
        assert browser.get(f"{server.base}/admin").url.path == "/admin/login"
    with spawn_server(env, tmp_path / "d.log", "--no-dispatcher") as server:
        # The same password again does not bring an ended session back.
        assert browser.get(f"{server.base}/admin").url.path == "/admin/login"
        browser = operator_session(server)
    with spawn_server(child_env(db_url), tmp_path / "e.log", "--no-dispatcher") as server:
        assert browser.get(f"{server.base}/admin").url.path == "/admin/login"


def test_operator_sign_in_is_limited_per_address(db_url: str, tmp_path: Path):
    env = child_env(db_url, JUSTSCAN_ADMIN_PASSWORD=ADMIN_PASSWORD)
    with spawn_server(env, tmp_path / "s.log", "--no-dispatcher") as server:
        c = httpx.Client(base_url=server.base, follow_redirects=True, timeout=30)
        statuses = []
        for i in range(7):
            form = c.get("/admin/login")
            r = c.post("/admin/login", data={"csrf": csrf_of(form.text), "password": f"guess number {i}"})
            statuses.append(r.status_code)
        assert statuses == [401] * 5 + [429] * 2
        assert int(r.headers["retry-after"]) >= 1
        # The right password is refused too while the address waits: guessing gains nothing.
        form = c.get("/admin/login")
        r = c.post("/admin/login", data={"csrf": csrf_of(form.text), "password": ADMIN_PASSWORD})
        assert r.status_code == 429
        # API keys are not throttled by the operator's limit.
        kit_login = c.get("/login")
        assert kit_login.status_code == 200


def test_the_log_stops_refreshing_once_nothing_is_open(db_url: str, tmp_path: Path):
    """The page refreshes itself while deliveries are open. Deactivation closes them, and a test
    delivery to the inactive webhook is sent: before, it stayed pending and the page refreshed
    forever."""
    from justscan_mcp.config import Settings
    from tests.receiver import Receiver, Reply
    from tests.test_dashboard import sign_in

    maker = App.build(Settings(database_url=db_url, allow_private_targets=True))
    env = child_env(
        db_url,
        JUSTSCAN_ALLOW_PRIVATE_TARGETS="1",
        JUSTSCAN_RETRY_SCHEDULE="60,60,60",
        JUSTSCAN_DELIVERY_TIMEOUT="3",
    )
    with Receiver() as receiver, spawn_server(env, tmp_path / "s.log") as server:
        kit = make_team(maker, "live-page")
        hook = maker.service.create_webhook(
            principal=kit.principal(), url=receiver.url("/p"), events=["scan"]
        )
        receiver.secrets["/p"] = hook.secret
        receiver.expect("/p", Reply(500))
        (did,) = maker.service.emit_event(
            team_id=kit.team.id, event="scan", data={"qr_code_id": 4, "scan_id": 1}
        ).deliveries
        wait_for(
            lambda: maker.store.get_delivery(team_id=kit.team.id, delivery_id=did)[0].state == "retrying",
            what="a retrying delivery",
        )
        c, csrf = sign_in(server, kit.rw.key)
        assert 'data-live="1"' in c.get(f"/webhooks/{hook.id}").text
        off = c.post(f"/webhooks/{hook.id}/active", data={"csrf": csrf, "active": "false"})
        assert off.status_code == 200 and 'data-live="1"' not in off.text
        tested = c.post(f"/webhooks/{hook.id}/test", data={"csrf": csrf})
        assert tested.status_code == 200
        assert '<span class="state state-succeeded">succeeded</span>' in tested.text
        assert '<span class="code" data-test-status>200</span>' in tested.text
        assert 'data-live="1"' not in c.get(f"/webhooks/{hook.id}").text
        assert [r.headers["x-webhook-event"] for r in receiver.at("/p")] == ["scan", "test"]
    maker.close()

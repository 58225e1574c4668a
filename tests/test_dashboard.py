"""The dashboard over real HTTP (a real `serve --transport http`), page by page: sessions,
CSRF, scopes, team isolation, bad input, the operator's area. tests/test_dashboard_browser.py
drives the same pages in a real browser."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from justscan_mcp.app import App
from tests.conftest import PUBLIC_URL, HttpServer, TeamKit, child_env, make_team, spawn_server

ADMIN_PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def dash(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """A server with the admin area open and no dispatcher (its webhooks point at public
    addresses and must never be sent to)."""
    log = tmp_path_factory.mktemp("dash") / "server.log"
    env = child_env(db_url, JUSTSCAN_ADMIN_PASSWORD=ADMIN_PASSWORD)
    with spawn_server(env, log, "--no-dispatcher") as server:
        yield server


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def browser(server: HttpServer) -> httpx.Client:
    return httpx.Client(base_url=server.base, follow_redirects=True, timeout=30)


def sign_in(server: HttpServer, key: str) -> tuple[httpx.Client, str]:
    c = browser(server)
    form = c.get("/login")
    page = c.post("/login", data={"csrf": csrf_of(form.text), "api_key": key})
    assert page.status_code == 200 and page.url.path == "/webhooks", page.text[:300]
    return c, csrf_of(page.text)


def sign_in_operator(server: HttpServer) -> tuple[httpx.Client, str]:
    c = browser(server)
    form = c.get("/admin/login")
    page = c.post("/admin/login", data={"csrf": csrf_of(form.text), "password": ADMIN_PASSWORD})
    assert page.status_code == 200 and page.url.path == "/admin", page.text[:300]
    return c, csrf_of(page.text)


def test_session_cookie_is_httponly_samesite_strict_and_sign_out_ends_it(dash: HttpServer, kit: TeamKit):
    c = browser(dash)
    form = c.get("/login")
    assert form.headers["content-security-policy"].startswith("default-src 'none'")
    raw = c.post("/login", data={"csrf": csrf_of(form.text), "api_key": kit.rw.key}, follow_redirects=False)
    assert raw.status_code == 303 and raw.headers["location"] == "/webhooks"
    cookie = next(v for v in raw.headers.get_list("set-cookie") if v.startswith("justscan_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert kit.rw.key not in cookie and kit.rw.key not in raw.headers["location"]
    page = c.get("/webhooks")
    assert page.status_code == 200 and f"{kit.team.name} · key {kit.rw.prefix}…" in page.text
    out = c.post("/logout", data={"csrf": csrf_of(page.text)})
    assert out.url.path == "/login" and "signed out" in out.text
    # The old cookie is dead on the server, not just forgotten by this browser.
    token = cookie.split(";")[0].split("=", 1)[1]
    again = httpx.get(f"{dash.base}/webhooks", cookies={"justscan_session": token}, follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"] == "/login"


def test_bad_keys_are_refused_without_a_session(dash: HttpServer, app: App, kit: TeamKit):
    c = browser(dash)
    for key, words in [
        ("", "no API key"),
        ("nope", "not a justscan API key"),
        ("jsi_" + "x" * 43, "unknown"),
    ]:
        page = c.post("/login", data={"csrf": csrf_of(c.get("/login").text), "api_key": key})
        assert page.status_code == 401 and words in page.text
        assert "justscan_session" not in c.cookies
    revoked = kit.key()
    app.service.revoke_api_key(key_id=revoked.id)
    page = c.post("/login", data={"csrf": csrf_of(c.get("/login").text), "api_key": revoked.key})
    assert page.status_code == 401 and "revoked" in page.text


def test_revoking_the_key_ends_its_dashboard_session(dash: HttpServer, app: App, kit: TeamKit):
    key = kit.key()
    c, _ = sign_in(dash, key.key)
    app.service.revoke_api_key(key_id=key.id)
    assert c.get("/webhooks").url.path == "/login"


def test_every_form_needs_the_session_csrf_token_and_same_origin(dash: HttpServer, kit: TeamKit):
    c, csrf = sign_in(dash, kit.rw.key)
    body = {"url": PUBLIC_URL, "events": ["scan"]}
    for data, headers in [
        (body, {}),
        (body | {"csrf": "forged"}, {}),
        (body | {"csrf": csrf}, {"Origin": "https://evil.example"}),
    ]:
        refused = c.post("/webhooks", data=data, headers=headers)
        assert refused.status_code == 403 and "another site" in refused.text
    assert kit.webhook_count() == 0
    login = browser(dash)
    login.get("/login")
    assert login.post("/login", data={"csrf": "guess", "api_key": kit.rw.key}).status_code == 403
    made = c.post("/webhooks", data=body | {"csrf": csrf}, headers={"Origin": dash.base})
    assert made.status_code == 201 and kit.webhook_count() == 1


def test_create_shows_the_secret_once_and_bad_input_names_the_field(dash: HttpServer, kit: TeamKit):
    c, csrf = sign_in(dash, kit.rw.key)
    made = c.post("/webhooks", data={"csrf": csrf, "url": PUBLIC_URL, "events": ["scan", "first_scan"]})
    assert made.status_code == 201 and made.headers["cache-control"] == "no-store"
    secret = re.search(r'id="secret" readonly value="(whsec_[^"]+)"', made.text)
    assert secret and "data-copy" in made.text
    hook_id = int(re.search(r'href="/webhooks/(\d+)"', made.text).group(1))  # type: ignore[union-attr]
    assert secret.group(1) not in c.get("/webhooks").text + c.get(f"/webhooks/{hook_id}").text
    for data, field in [
        ({"url": "http://10.0.0.1/x", "events": ["scan"]}, "url"),
        ({"url": "ftp://x", "events": ["scan"]}, "url"),
        ({"url": PUBLIC_URL}, "events"),
        ({"url": PUBLIC_URL, "events": ["scan", "nope"]}, "events"),
        ({"url": PUBLIC_URL, "events": ["scan"], "description": "x" * 501}, "description"),
        ({"url": PUBLIC_URL, "events": ["scan"], "rate_limit": "0"}, "rate_limit"),
        ({"url": PUBLIC_URL, "events": ["scan"], "rate_limit": "1001"}, "rate_limit"),
        ({"url": PUBLIC_URL, "events": ["scan"], "rate_limit": "fast"}, "rate_limit"),
    ]:
        bad = c.post("/webhooks", data=data | {"csrf": csrf})
        assert bad.status_code == 422 and f"{field}:" in bad.text, (data, bad.text[:400])
    assert kit.webhook_count() == 1


def test_edit_disable_enable_rotate_and_delete_with_a_confirm_step(dash: HttpServer, app: App, kit: TeamKit):
    c, csrf = sign_in(dash, kit.rw.key)
    hook = app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"])
    edited = c.post(
        f"/webhooks/{hook.id}/edit",
        data={"csrf": csrf, "url": PUBLIC_URL, "events": ["form_submit"], "description": "<i>ops</i>"},
    )
    assert edited.status_code == 200 and "Webhook saved." in edited.text
    assert "&lt;i&gt;ops&lt;/i&gt;" in edited.text and "<i>ops</i>" not in edited.text
    got = app.service.get_webhook(principal=kit.principal(), webhook_id=hook.id)
    assert got.events == ["form_submit"] and got.description == "<i>ops</i>" and got.rate_limit is None
    limited = c.post(
        f"/webhooks/{hook.id}/edit",
        data={"csrf": csrf, "url": PUBLIC_URL, "events": ["form_submit"], "rate_limit": "12"},
    )
    assert "<span data-rate-limit>12</span> per second" in limited.text
    assert app.service.get_webhook(principal=kit.principal(), webhook_id=hook.id).rate_limit == 12
    bad = c.post(
        f"/webhooks/{hook.id}/edit",
        data={"csrf": csrf, "url": PUBLIC_URL, "events": ["form_submit"], "rate_limit": "0"},
    )
    assert bad.status_code == 422 and "rate_limit:" in bad.text
    unlimited = c.post(
        f"/webhooks/{hook.id}/edit", data={"csrf": csrf, "url": PUBLIC_URL, "events": ["form_submit"]}
    )
    assert "data-rate-limit" not in unlimited.text
    assert app.service.get_webhook(principal=kit.principal(), webhook_id=hook.id).rate_limit is None
    off = c.post(f"/webhooks/{hook.id}/active", data={"csrf": csrf, "active": "false"})
    assert "Webhook disabled" in off.text and "Enable" in off.text
    assert app.service.get_webhook(principal=kit.principal(), webhook_id=hook.id).active is False
    on = c.post(f"/webhooks/{hook.id}/active", data={"csrf": csrf, "active": "true"})
    assert "Webhook enabled" in on.text
    rotated = c.post(f"/webhooks/{hook.id}/rotate", data={"csrf": csrf})
    new = re.search(r'id="secret" readonly value="(whsec_[^"]+)"', rotated.text)
    assert new and new.group(1) != hook.secret and "keeps signing" in rotated.text
    confirm = c.get(f"/webhooks/{hook.id}/delete")
    assert confirm.status_code == 200 and "Delete permanently" in confirm.text
    assert kit.webhook_count() == 1  # the confirm page changes nothing
    gone = c.post(f"/webhooks/{hook.id}/delete", data={"csrf": csrf})
    assert gone.url.path == "/webhooks" and "Webhook deleted." in gone.text and kit.webhook_count() == 0


def test_read_only_key_sees_but_cannot_change(dash: HttpServer, app: App, kit: TeamKit):
    hook = app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"])
    ro = kit.key(scopes=["webhooks:read"])
    c, csrf = sign_in(dash, ro.key)
    listing = c.get("/webhooks").text
    assert f"#{hook.id}" in listing and "Create webhook" not in listing and "read-only" in listing
    detail = c.get(f"/webhooks/{hook.id}").text
    assert "Send test delivery" not in detail and "Rotate secret" not in detail
    for path, data in [
        ("/webhooks", {"url": PUBLIC_URL, "events": ["scan"]}),
        (f"/webhooks/{hook.id}/active", {"active": "false"}),
        (f"/webhooks/{hook.id}/delete", {}),
        (f"/webhooks/{hook.id}/test", {}),
    ]:
        refused = c.post(path, data=data | {"csrf": csrf})
        assert refused.status_code == 403 and "webhooks:write" in refused.text, path
    assert kit.webhook_count() == 1
    assert app.service.get_webhook(principal=kit.principal(), webhook_id=hook.id).active is True


def test_another_teams_webhook_is_not_found_and_untouched(dash: HttpServer, app: App, kit: TeamKit):
    theirs = make_team(app, "theirs")
    hook = app.service.create_webhook(principal=theirs.principal(), url=PUBLIC_URL, events=["scan"])
    c, csrf = sign_in(dash, kit.rw.key)
    assert c.get(f"/webhooks/{hook.id}").status_code == 404
    assert c.get(f"/webhooks/{hook.id}/delete").status_code == 404
    for action in ("delete", "active", "rotate", "test", "edit"):
        refused = c.post(
            f"/webhooks/{hook.id}/{action}",
            data={"csrf": csrf, "active": "false", "url": PUBLIC_URL, "events": ["scan"]},
        )
        assert refused.status_code == 404 and "does not exist in this team" in refused.text, action
    assert f"#{hook.id} " not in c.get("/webhooks").text
    assert theirs.webhook_count() == 1
    assert app.service.get_webhook(principal=theirs.principal(), webhook_id=hook.id).active is True


def test_filters_are_checked(dash: HttpServer, app: App, kit: TeamKit):
    hook = app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"])
    c, _ = sign_in(dash, kit.rw.key)
    assert c.get(f"/webhooks/{hook.id}?state=failed&event=scan").status_code == 200
    bad = c.get(f"/webhooks/{hook.id}?state=gone")
    assert bad.status_code == 422 and "state:" in bad.text
    bad = c.get(f"/webhooks/{hook.id}?event=<b>x</b>")
    assert bad.status_code == 422 and "&lt;b&gt;" in bad.text and "<b>x</b>" not in bad.text


def every_page(op: httpx.Client, url: str, after: str) -> str:
    """An operator's list, followed across its "Next" pages (`after`: the page's cursor
    parameter). The PostgreSQL database is shared by the session: run after tests/test_faults.py,
    other modules' webhooks filled the first page and this module's webhooks were on a later
    one; run in another order (pytest -n), other modules' teams filled the first page of keys."""
    pages: list[str] = []
    next_url: str | None = url
    while next_url is not None:
        text = op.get(next_url).text
        pages.append(text)
        more = re.search(rf'href="({re.escape(url)}\?{after}=\d+)"', text)
        next_url = more.group(1) if more else None
    return "".join(pages)


def test_operator_area_needs_the_admin_password_and_sees_every_team(dash: HttpServer, app: App, kit: TeamKit):
    other = make_team(app, "other")
    mine = app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"])
    theirs = app.service.create_webhook(principal=other.principal(), url=PUBLIC_URL, events=["file_download"])
    anon = browser(dash)
    assert anon.get("/admin").url.path == "/admin/login"
    wrong = anon.post(
        "/admin/login", data={"csrf": csrf_of(anon.get("/admin/login").text), "password": "guess"}
    )
    assert wrong.status_code == 401 and "wrong admin password" in wrong.text
    keyed, _ = sign_in(dash, kit.rw.key)
    assert keyed.get("/admin").url.path == "/admin/login"  # an API key is not an operator
    op, csrf = sign_in_operator(dash)
    page = every_page(op, "/admin", "webhooks_after")
    assert f"#{mine.id} {PUBLIC_URL}" in page and f"#{theirs.id} {PUBLIC_URL}" in page
    keys = every_page(op, "/admin/keys", "teams_after")
    assert f'data-key="{kit.rw.id}"' in keys and f'data-key="{other.rw.id}"' in keys
    assert kit.rw.key not in keys and other.rw.key not in keys
    off = op.post(f"/admin/keys/{other.rw.id}/mcp", data={"csrf": csrf, "mcp_enabled": "false"})
    assert "MCP turned off" in off.text
    assert app.service.authenticate(other.rw.key).mcp_enabled is False
    assert op.post("/admin/keys/99999999/mcp", data={"csrf": csrf, "mcp_enabled": "true"}).status_code == 404
    assert op.get("/webhooks").url.path == "/admin"  # the operator has no team of its own


def test_the_operator_sees_and_revokes_any_teams_connected_app(dash: HttpServer, app: App, kit: TeamKit):
    client = app.service.register_oauth_client(
        document={"client_name": "Some assistant", "redirect_uris": ["http://127.0.0.1:1/cb"]}, secret=None
    )
    handle = app.service.begin_authorization(
        client_id=client, request={"code_challenge": "c" * 43, "redirect_uri": "http://127.0.0.1:1/cb"}
    )
    app.service.approve_authorization(principal=kit.principal(), handle=handle, scopes=["webhooks:read"])
    (grant,) = app.service.connected_apps(team_id=kit.team.id)
    op, csrf = sign_in_operator(dash)
    page = op.get("/admin").text
    assert f'data-grant="{grant["grant_id"]}"' in page and "Some assistant" in page
    assert op.post("/admin/apps/999999999/revoke", data={"csrf": csrf}).status_code == 404
    assert op.post(f"/admin/apps/{grant['grant_id']}/revoke", data={"csrf": "forged"}).status_code == 403
    assert app.service.connected_apps(team_id=kit.team.id) != []
    done = op.post(f"/admin/apps/{grant['grant_id']}/revoke", data={"csrf": csrf})
    assert "App revoked" in done.text
    # The confirmation audit log is readable there too.
    app.service.record_confirmation(
        principal=kit.principal(),
        tool="delete_webhook",
        webhook_id=None,
        question="Delete <b>#1</b>?",
        answer="decline",
    )
    audit = op.get("/admin").text
    assert "Delete &lt;b&gt;#1&lt;/b&gt;?" in audit and "<td>decline</td>" in audit
    assert "Live dispatchers" in audit  # (this server runs none; others on the shared database may)
    # The "Now" section shows operations_status, the figures `justscan-mcp status` prints.
    ops = app.service.operations_status()
    assert "<dt>Open deliveries</dt>" in audit and "<dt>Oldest due delivery</dt>" in audit
    assert f"<dt>Switched off for failing</dt><dd>{ops.switched_off}</dd>" in audit
    assert app.service.connected_apps(team_id=kit.team.id) == []


def test_admin_area_is_closed_without_a_configured_password(db_url: str, tmp_path: Path):
    with spawn_server(child_env(db_url), tmp_path / "server.log", "--no-dispatcher") as server:
        c = browser(server)
        page = c.post("/admin/login", data={"csrf": csrf_of(c.get("/admin/login").text), "password": ""})
        assert page.status_code == 401 and "JUSTSCAN_ADMIN_PASSWORD" in page.text


def test_no_key_secret_or_password_reaches_the_server_log(dash: HttpServer, kit: TeamKit):
    c, csrf = sign_in(dash, kit.rw.key)
    made = c.post("/webhooks", data={"csrf": csrf, "url": PUBLIC_URL, "events": ["scan"]})
    secret = re.search(r'value="(whsec_[^"]+)"', made.text).group(1)  # type: ignore[union-attr]
    sign_in_operator(dash)
    log = dash.log.read_text()
    assert "POST /webhooks" in log
    for value in (kit.rw.key, secret, ADMIN_PASSWORD, csrf):
        assert value not in log


def test_log_shows_open_work_live_and_redeliver_queues_a_linked_copy(
    dash: HttpServer, app: App, kit: TeamKit
):
    hook = app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"])
    (did,) = app.service.emit_event(
        team_id=kit.team.id, event="scan", data={"qr_code_id": 9, "scan_id": 1}
    ).deliveries
    c, csrf = sign_in(dash, kit.rw.key)
    page = c.get(f"/webhooks/{hook.id}")
    # This server has no dispatcher: the delivery stays pending and the page keeps refreshing.
    assert f'data-delivery="{did}"' in page.text and 'data-live="1"' in page.text
    again = c.post(f"/deliveries/{did}/redeliver", data={"csrf": csrf})
    assert again.url.path == f"/webhooks/{hook.id}" and "Redelivery queued" in again.text
    log = app.service.list_deliveries(principal=kit.principal(), webhook_id=hook.id).deliveries
    assert [d.redelivery_of for d in log] == [did, None]
    other = make_team(app, "redeliver-other")
    theirs = app.service.create_webhook(principal=other.principal(), url=PUBLIC_URL, events=["scan"])
    (foreign,) = app.service.emit_event(
        team_id=other.team.id, event="scan", data={"qr_code_id": 9, "scan_id": 2}
    ).deliveries
    refused = c.post(f"/deliveries/{foreign}/redeliver", data={"csrf": csrf})
    assert refused.status_code == 404
    assert len(app.service.list_deliveries(principal=other.principal(), webhook_id=theirs.id).deliveries) == 1
    assert c.post(f"/deliveries/{did}/redeliver", data={"csrf": "x"}).status_code == 403


def test_failing_deliveries_name_their_webhook_even_beyond_the_listed_webhooks(app: App, kit: TeamKit):
    first = make_team(app, "first")  # the oldest webhook overall is not this test's
    app.service.create_webhook(principal=first.principal(), url=PUBLIC_URL, events=["scan"])
    hook = app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL + "/late", events=["scan"])
    (did,) = app.service.emit_event(
        team_id=kit.team.id, event="scan", data={"qr_code_id": 3, "scan_id": 3}
    ).deliveries
    app.service.update_webhook(principal=kit.principal(), webhook_id=hook.id, changes={"active": False})
    overview = app.service.admin_overview(limit=1)  # one webhook listed, and it is not ours
    assert [w.id for w in overview.webhooks] != [hook.id]
    (failing,) = overview.failing
    assert (failing.id, failing.state, failing.team_id, failing.url) == (did, "failed", kit.team.id, hook.url)


def _statements(app: App, fn) -> int:
    """How many SQL statements `fn()` sends to the database."""
    from sqlalchemy import event

    count = 0

    def seen(*_: object) -> None:
        nonlocal count
        count += 1

    event.listen(app.store.engine, "before_cursor_execute", seen)
    try:
        fn()
    finally:
        event.remove(app.store.engine, "before_cursor_execute", seen)
    return count


def _failing_hooks(app: App, kit: TeamKit, n: int) -> None:
    for i in range(n):
        hook = app.service.create_webhook(principal=kit.principal(), url=f"{PUBLIC_URL}/{i}", events=["scan"])
        app.service.emit_event(team_id=kit.team.id, event="scan", data={"qr_code_id": 100 + i, "scan_id": 1})
        app.service.update_webhook(principal=kit.principal(), webhook_id=hook.id, changes={"active": False})


def test_admin_pages_run_a_fixed_number_of_queries_whatever_their_size(app: App, kit: TeamKit):
    """The overview ran two queries per listed webhook (up to 400 a page); the key page one per
    team. Both are now a fixed handful, however many rows a page shows."""
    _failing_hooks(app, kit, 2)
    small = _statements(app, lambda: app.service.admin_overview())
    _failing_hooks(app, kit, 12)
    large = _statements(app, lambda: app.service.admin_overview())
    assert large == small, (small, large)
    assert len(app.service.admin_overview().failing) >= 14
    make_team(app, "keys-1")
    few = _statements(app, lambda: app.service.admin_keys())
    for i in range(5):
        make_team(app, f"keys-more-{i}")
    assert _statements(app, lambda: app.service.admin_keys()) == few


def _walk(fetch, items, following) -> list[int]:
    """Every id a keyset-paged list gives, page after page until it has no next position."""
    seen: list[int] = []
    position = None
    while True:
        page = fetch(position)
        seen += [item.id for item in items(page)]
        position = following(page)
        if position is None:
            return seen


def test_admin_lists_page_instead_of_stopping_at_a_cut(app: App, kit: TeamKit):
    """The lists were cut at 200 rows; each now pages on its own."""
    _failing_hooks(app, kit, 5)
    overview = app.service.admin_overview
    hooks = _walk(
        lambda after: overview(limit=2, webhooks_after=after or 0),
        lambda page: page.webhooks,
        lambda page: page.next_webhooks,
    )
    assert hooks == [w.id for w in app.store.all_webhooks(limit=100_000)]
    failing = _walk(
        lambda before: overview(limit=2, failing_before=before),
        lambda page: page.failing,
        lambda page: page.next_failing,
    )
    assert failing == sorted(failing, reverse=True) and len(set(failing)) == len(failing) >= 5
    teams = _walk(
        lambda after: app.service.admin_keys(limit=2, teams_after=after or 0),
        lambda page: page.teams,
        lambda page: page.next_teams,
    )
    assert teams == [t.id for t in app.service.list_teams()]


def test_failing_list_walks_its_partial_index(tmp_path: Path):
    """SQLite's plan names the index (PostgreSQL chooses by table size, so no plan is pinned)."""
    from sqlalchemy import text

    from justscan_mcp.config import Settings

    local = App.build(Settings(database_url=f"sqlite:///{tmp_path / 'plan.db'}"))
    local.prepare()
    try:
        with local.store.session() as s:
            plan = s.exec(
                text(
                    "EXPLAIN QUERY PLAN SELECT deliveries.id FROM deliveries WHERE "
                    "deliveries.state IN ('failed', 'retrying') ORDER BY deliveries.id DESC LIMIT 5"
                )
            ).all()
    finally:
        local.close()
    assert "ix_deliveries_failing" in str(plan), plan

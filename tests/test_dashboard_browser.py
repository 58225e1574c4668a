"""The dashboard in a real headless browser: Debian's Chromium driven by Playwright for Python.

A person signs in with an API key and creates a webhook pointing at a real receiver on
127.0.0.1. They send a test delivery and read its status code on the page (the receiver's
HTML-looking body is shown as text, never run), then disable the webhook. Another team's
webhook is refused. An operator turns a key's MCP switch off, and a real MCP client sees it.

With JUSTSCAN_SCREENSHOTS=DIR the main pages are saved there as PNG (docs/ holds the committed
ones); otherwise into the test's temporary directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from justscan_mcp.app import App
from justscan_mcp.config import Settings
from tests.conftest import PUBLIC_URL, child_env, make_team, missing, spawn_server
from tests.receiver import Receiver, Reply

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ADMIN_PASSWORD = "operator password for the browser test"
HOSTILE_BODY = b'<script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2">accepted'


@pytest.fixture
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        missing(CHROMIUM, "install Debian's chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            browser.close()


def shots_dir(tmp_path: Path) -> Path:
    target = Path(os.environ.get("JUSTSCAN_SCREENSHOTS") or tmp_path / "shots")
    target.mkdir(parents=True, exist_ok=True)
    return target


def mcp_tools(base: str, key: str) -> list[str] | str:
    """What a real MCP client (the SDK's, over streamable HTTP) gets with this key."""

    async def go() -> list[str] | str:
        try:
            hc = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30)
            async with Client(streamable_http_client(f"{base}/mcp", http_client=hc)) as c:
                return sorted(t.name for t in (await c.list_tools()).tools)
        except Exception as exc:  # the SDK reports an HTTP refusal as an error
            return f"refused: {exc!r}"

    # In a thread of its own: Playwright's sync API holds this thread's event loop.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, go).result()


def test_dashboard_in_a_real_browser(chromium: Any, tmp_path: Path):
    db_url = f"sqlite:///{tmp_path / 'dashboard.db'}"
    app = App.build(Settings(database_url=db_url))
    app.store.migrate()
    app.prepare()
    kit = make_team(app, "browser")
    other = make_team(app, "elsewhere")
    theirs = app.service.create_webhook(principal=other.principal(), url=PUBLIC_URL, events=["scan"])
    shots = shots_dir(tmp_path)
    env = child_env(
        db_url,
        JUSTSCAN_ALLOW_PRIVATE_TARGETS="1",
        JUSTSCAN_ADMIN_PASSWORD=ADMIN_PASSWORD,
        JUSTSCAN_POLL_INTERVAL="0.2",
    )
    with Receiver() as receiver, spawn_server(env, tmp_path / "server.log") as server:
        # The other team's webhook points at a public address: make sure nothing ever sends
        # to it (it has no events; this server only ever gets a test for our own webhook).
        receiver.expect("/dash", Reply(202, body=HOSTILE_BODY))
        context = chromium.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

        page.goto(server.base + "/")
        assert page.url.endswith("/login")
        page.screenshot(path=str(shots / "dashboard-sign-in.png"))
        page.get_by_label("API key").fill(kit.rw.key)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("heading", name="Account → Webhooks").wait_for()
        # The header names the team and the key, not bare ids; the empty list says what to do.
        assert f"{kit.team.name} · key {kit.rw.prefix}…" in page.inner_text("header")
        assert "No webhooks yet: create one below" in page.inner_text("main")

        page.get_by_label("Endpoint URL").fill(receiver.url("/dash"))
        page.get_by_label("scan", exact=True).check()
        page.get_by_label("Description (optional)").fill("Zapier bridge")
        page.get_by_role("button", name="Create webhook").click()
        page.get_by_role("heading", name="Webhook created").wait_for()
        secret = page.locator("#secret").input_value()
        assert secret.startswith("whsec_")
        receiver.secrets["/dash"] = secret  # the receiver checks every signature with it
        page.screenshot(path=str(shots / "dashboard-secret-once.png"))

        page.get_by_role("link", name="Go to the webhook").click()
        hook_id = int(re.search(r"/webhooks/(\d+)$", page.url).group(1))  # type: ignore[union-attr]
        page.get_by_role("button", name="Send test delivery").click()
        status = page.locator("[data-test-status]")
        status.wait_for()
        assert status.inner_text() == "202"
        (got,) = receiver.at("/dash")
        assert got.verified
        # The receiver's body is on the page as text, twice (outcome and log), and never ran.
        assert page.get_by_text("<script>window.__pwned = 1</script>", exact=False).count() >= 1
        assert page.evaluate("window.__pwned") is None and dialogs == []
        row = page.locator("tr[data-delivery]").first
        assert "succeeded" in row.inner_text() and "202" in row.inner_text()
        # The chart of the last 24 hours: one bar group per hour, this hour's holding the test.
        page.goto(f"{server.base}/webhooks/{hook_id}")  # not reload(): that would post the test again
        hours = page.locator("svg.chart g.hour")
        assert hours.count() == 24
        assert page.locator("svg.chart rect.bar").count() == 48  # succeeded and failed per hour
        now = hours.nth(23)
        assert (now.get_attribute("data-succeeded"), now.get_attribute("data-failed")) == ("1", "0")
        drawn = now.locator("rect.bar.ok").bounding_box()
        assert drawn is not None and drawn["height"] > 50  # the tallest bar: the whole scale
        assert all(hours.nth(i).get_attribute("data-succeeded") == "0" for i in range(23))
        assert page.locator("[data-success-rate]").inner_text() == "100.0%"
        page.screenshot(path=str(shots / "dashboard-webhook-and-log.png"), full_page=True)

        page.get_by_role("button", name="Disable").click()
        page.get_by_text("Webhook disabled").wait_for()
        assert page.get_by_role("button", name="Enable").is_visible()
        assert app.service.get_webhook(principal=kit.principal(), webhook_id=hook_id).active is False

        page.goto(server.base + "/webhooks")
        assert "disabled" in page.locator("tbody tr").first.inner_text()
        page.screenshot(path=str(shots / "dashboard-webhooks.png"), full_page=True)

        refused = page.goto(f"{server.base}/webhooks/{theirs.id}")
        assert refused is not None and refused.status == 404
        assert "does not exist in this team" in page.inner_text("main")

        # A phone-sized viewport still shows the log and its actions.
        phone = chromium.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
        phone.add_cookies(context.cookies())
        small = phone.new_page()
        small.goto(f"{server.base}/webhooks/{hook_id}")
        assert small.get_by_role("button", name="Enable").is_visible()
        # Below 600 px each delivery is a card: every field is inside the screen, none cut off.
        cells = small.locator("tr[data-delivery] td[data-label]")
        assert cells.count() == 7
        for i in range(cells.count()):
            box = cells.nth(i).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, (i, box)
        label = small.evaluate(
            "getComputedStyle(document.querySelector('tr[data-delivery] td[data-label=\"Next retry\"]'),"
            " '::before').content"
        )
        assert "Next retry" in label, label
        small.screenshot(path=str(shots / "dashboard-phone.png"), full_page=True)
        phone.close()

        # The operator: the API key page and its MCP switch, seen by a real MCP client.
        before = mcp_tools(server.base, kit.rw.key)
        assert isinstance(before, list) and "create_webhook" in before, before
        op = chromium.new_context(viewport={"width": 1200, "height": 900}).new_page()
        op.goto(server.base + "/admin/login")
        op.get_by_label("Admin password").fill(ADMIN_PASSWORD)
        op.get_by_role("button", name="Sign in").click()
        op.get_by_role("heading", name="Admin: all teams").wait_for()
        assert f"#{theirs.id} {PUBLIC_URL}" in op.inner_text("main")
        assert receiver.url("/dash") in op.inner_text("main")
        assert op.locator(f'[data-team-success="{kit.team.id}"]').inner_text() == "100.0%"
        op.screenshot(path=str(shots / "dashboard-admin.png"), full_page=True)
        op.get_by_role("link", name="API keys").click()
        op.get_by_role("button", name=f"Turn MCP off for key {kit.rw.id}").click()
        op.get_by_text("MCP turned off for that key.").wait_for()
        assert op.locator(f'tr[data-key="{kit.rw.id}"] [data-mcp]').inner_text() == "off"
        op.screenshot(path=str(shots / "dashboard-api-keys.png"), full_page=True)
        seen = mcp_tools(server.base, kit.rw.key)
        assert isinstance(seen, str) and seen.startswith("refused"), seen
        op.get_by_role("button", name=f"Turn MCP on for key {kit.rw.id}").click()
        op.get_by_text("MCP turned on for that key.").wait_for()
        assert isinstance(mcp_tools(server.base, kit.rw.key), list)
        context.close()
    log = (tmp_path / "server.log").read_text()
    for value in (kit.rw.key, secret, ADMIN_PASSWORD):
        assert value not in log
    assert [r.path for r in receiver.received] == ["/dash"]  # nothing else was ever sent
    app.close()


def test_oauth_sign_in_and_consent_in_a_real_browser(chromium: Any, tmp_path: Path):
    """An assistant sends the person to /authorize; in the browser they sign in with a key,
    see the app and where it sends them back, and approve; the app gets its code."""
    import base64
    import hashlib
    import secrets as pysecrets
    from urllib.parse import parse_qs, urlencode, urlsplit

    import httpx

    db_url = f"sqlite:///{tmp_path / 'oauth.db'}"
    app = App.build(Settings(database_url=db_url))
    app.store.migrate()
    app.prepare()
    kit = make_team(app, "consent")
    shots = shots_dir(tmp_path)
    redirect = "http://127.0.0.1:47003/callback"
    with spawn_server(child_env(db_url), tmp_path / "server.log") as server:
        client_id = httpx.post(
            f"{server.base}/register",
            json={"redirect_uris": [redirect], "client_name": "Claude", "token_endpoint_auth_method": "none"},
            timeout=10,
        ).json()["client_id"]
        verifier = pysecrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        query = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": "st-9",
            "scope": "webhooks:read webhooks:write",
            "resource": f"{server.base}/mcp",
        }
        context = chromium.new_context(viewport={"width": 1000, "height": 800})
        page = context.new_page()
        back: list[str] = []

        def catch(route: Any) -> None:  # the app's callback: nothing listens there, so answer here
            back.append(route.request.url)
            route.fulfill(status=200, body="connected")

        page.route("http://127.0.0.1:47003/**", catch)
        page.goto(f"{server.base}/authorize?{urlencode(query)}")
        page.get_by_text("An app asks to connect to your webhooks").wait_for()
        page.get_by_label("API key").fill(kit.rw.key)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("heading", name="Connect Claude?").wait_for()
        assert page.locator("[data-redirect-host]").inner_text() == "127.0.0.1:47003"
        assert page.get_by_label("see your webhooks", exact=False).is_checked()
        page.screenshot(path=str(shots / "dashboard-oauth-consent.png"), full_page=True)
        page.get_by_label("create, change, test and delete", exact=False).uncheck()
        page.get_by_role("button", name="Approve").click()
        page.get_by_text("connected").wait_for()
        context.close()
    assert len(back) == 1
    sent = parse_qs(urlsplit(back[0]).query)
    assert sent["state"] == ["st-9"] and sent["code"][0].startswith("jsac_") and sent["iss"] == [server.base]
    (grant,) = app.service.connected_apps(team_id=kit.team.id)
    assert grant["scopes"] == ["webhooks:read"] and grant["client_name"] == "Claude"
    app.close()

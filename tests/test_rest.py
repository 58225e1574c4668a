"""The REST API (/api/v1) on a real server: every endpoint, every scope, errors, limits, OpenAPI.

Deliveries only ever go to the local receiver: the server that sends (`live`) allows private
targets and every webhook it delivers for points at 127.0.0.1. The strict server (`http_server`,
private targets refused) is used for validation only and records no events.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from justscan_mcp.app import App
from justscan_mcp.config import Settings
from tests.conftest import PUBLIC_URL, HttpServer, TeamKit, child_env, make_team, spawn_server, wait_for
from tests.receiver import Receiver, Reply

API = "/api/v1"


@pytest.fixture(scope="module")
def receiver(db_url: str) -> Iterator[Receiver]:
    # One receiver per database parameter: paths repeat between the SQLite and PostgreSQL runs.
    with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
def live(db_url: str, tmp_path_factory) -> Iterator[HttpServer]:
    env = child_env(
        db_url,
        JUSTSCAN_ALLOW_PRIVATE_TARGETS="1",
        JUSTSCAN_POLL_INTERVAL="0.1",
        JUSTSCAN_DELIVERY_TIMEOUT="2",
        JUSTSCAN_RETRY_SCHEDULE="0.2,0.4,0.6",
    )
    with spawn_server(env, tmp_path_factory.mktemp("live") / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def local_app(db_url: str) -> Iterator[App]:
    """Creates teams, keys and local webhooks directly (private targets allowed, no dispatcher)."""
    app = App.build(Settings(database_url=db_url, allow_private_targets=True))
    app.prepare()
    yield app
    app.close()


@dataclass
class Api:
    base: str
    key: str | None

    def __call__(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return httpx.request(method, f"{self.base}{API}{path}", headers=headers, timeout=30, **kwargs)


def as_key(server: HttpServer, key: str | None) -> Api:
    return Api(server.base, key)


def local_hook(kit: TeamKit, receiver: Receiver, path: str, events=("scan",)):
    hook = kit.app.service.create_webhook(
        principal=kit.principal(), url=receiver.url(path), events=list(events)
    )
    receiver.secrets[path] = hook.secret
    return hook


# --- scopes -------------------------------------------------------------------------------------

ENDPOINTS = [
    # (method, path template, body, required scope, success status)
    ("GET", "/webhooks", None, "webhooks:read", 200),
    ("POST", "/webhooks", "create", "webhooks:write", 201),
    ("GET", "/webhooks/{id}", None, "webhooks:read", 200),
    ("PUT", "/webhooks/{id}", {"description": "changed"}, "webhooks:write", 200),
    ("GET", "/webhooks/{id}/deliveries", None, "webhooks:read", 200),
    ("POST", "/webhooks/{id}/test", None, "webhooks:write", 200),
    ("POST", "/webhooks/{id}/rotate-secret", {"grace_seconds": 60}, "webhooks:write", 200),
    ("POST", "/deliveries/{delivery}/redeliver", None, "webhooks:write", 201),
    ("POST", "/events", {"event": "scan", "data": {"qr_code_id": 1, "scan_id": 1}}, "events:write", 202),
    ("DELETE", "/webhooks/{id}", None, "webhooks:write", 204),
]
SCOPE_SETS = {
    "read": ["webhooks:read"],
    "write": ["webhooks:write"],
    "events": ["events:write"],
    "all": ["webhooks:read", "webhooks:write", "events:write"],
}


@pytest.mark.parametrize("scope_set", list(SCOPE_SETS))
def test_every_endpoint_with_every_scope_combination(live, local_app, receiver, scope_set):
    kit = make_team(local_app, f"scopes-{scope_set}")
    hook = local_hook(kit, receiver, f"/scope-{scope_set}")
    first = local_app.service.emit_event(
        team_id=kit.team.id, event="scan", data={"qr_code_id": 2, "scan_id": 2}
    )
    key = kit.key(scopes=SCOPE_SETS[scope_set], mcp_enabled=False)  # the MCP switch does not matter for REST
    api = as_key(live, key.key)
    for method, template, body, scope, ok in ENDPOINTS:
        path = template.format(id=hook.id, delivery=first.deliveries[0])
        payload = (
            {"url": receiver.url(f"/scope-{scope_set}-new"), "events": ["form_submit"]}
            if body == "create"
            else body
        )
        r = api(method, path, json=payload) if payload is not None else api(method, path)
        if scope in SCOPE_SETS[scope_set]:
            assert r.status_code == ok, (method, path, r.text)
        else:
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"] == "forbidden" and scope in r.json()["message"]


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer jsi_" + "q" * 43, "revoked"])
def test_no_unknown_or_revoked_key_is_401_on_every_endpoint(live, local_app, header):
    kit = make_team(local_app, "rest401")
    if header == "revoked":
        gone = kit.key()
        local_app.service.revoke_api_key(key_id=gone.id)
        header = f"Bearer {gone.key}"
    for method, template, _body, _scope, _ok in ENDPOINTS:
        headers = {"Authorization": header} if header else {}
        r = httpx.request(
            method, f"{live.base}{API}{template.format(id=1, delivery=1)}", headers=headers, json={}
        )
        assert r.status_code == 401, (method, template, r.text)
        assert r.json()["error"] == "unauthenticated" and r.headers["www-authenticate"].startswith("Bearer")


def test_a_foreign_teams_ids_are_404_never_403(live, local_app, receiver):
    mine, theirs = make_team(local_app, "rest-mine"), make_team(local_app, "rest-theirs")
    hook = local_hook(theirs, receiver, "/theirs")
    sent = local_app.service.emit_event(
        team_id=theirs.team.id, event="scan", data={"qr_code_id": 3, "scan_id": 3}
    )
    api = as_key(live, mine.key(scopes=list(SCOPE_SETS["all"])).key)
    for method, template, body, _scope, _ok in ENDPOINTS:
        if template in ("/webhooks", "/events"):
            continue
        path = template.format(id=hook.id, delivery=sent.deliveries[0])
        r = api(method, path, json=body) if isinstance(body, dict) else api(method, path)
        assert r.status_code == 404, (method, path, r.text)
        missing = api(
            method,
            template.format(id=10**15, delivery=10**15),
            **({"json": body} if isinstance(body, dict) else {}),
        )
        assert missing.status_code == 404
        assert r.json()["message"].replace(str(hook.id), "N").replace(
            str(sent.deliveries[0]), "N"
        ) == missing.json()["message"].replace(str(10**15), "N")
    assert (
        theirs.app.service.get_webhook(principal=theirs.principal(), webhook_id=hook.id).description is None
    )


# --- validation (strict server: private targets refused; nothing is ever delivered) -------------

BAD_BODIES = [
    ({"url": "ftp://93.184.216.34/x", "events": ["scan"]}, "url"),
    ({"url": "/relative", "events": ["scan"]}, "url"),
    ({"url": "https://93.184.216.34/" + "a" * 2048, "events": ["scan"]}, "url"),
    ({"url": "https://127.0.0.1/x", "events": ["scan"]}, "url"),
    ({"url": "https://10.2.3.4/x", "events": ["scan"]}, "url"),
    ({"url": "https://169.254.169.254/x", "events": ["scan"]}, "url"),
    ({"url": "https://[::1]/x", "events": ["scan"]}, "url"),
    ({"url": "https://no-such-host.invalid/x", "events": ["scan"]}, "url"),
    ({"url": PUBLIC_URL, "events": ["scan2"]}, "events"),
    ({"url": PUBLIC_URL, "events": []}, "events"),
    ({"url": PUBLIC_URL, "events": ["scan", "scan"]}, "events"),
    ({"url": PUBLIC_URL, "events": "scan"}, "events"),
    ({"url": PUBLIC_URL, "events": ["scan"], "description": "d" * 501}, "description"),
    ({"url": PUBLIC_URL, "events": ["scan"], "description": 7}, "description"),
    ({"url": PUBLIC_URL, "events": ["scan"], "secret": "mine"}, "secret"),
    ({"url": PUBLIC_URL, "events": ["scan"], "rate_limit": 0}, "rate_limit"),
    ({"url": PUBLIC_URL, "events": ["scan"], "rate_limit": 1001}, "rate_limit"),
    ({"url": PUBLIC_URL, "events": ["scan"], "rate_limit": "5"}, "rate_limit"),
    ({"url": PUBLIC_URL, "events": ["scan"], "rate_limit": 2.5}, "rate_limit"),
    ({"events": ["scan"]}, "url"),
    ({"url": 5, "events": ["scan"]}, "url"),
]


@pytest.mark.parametrize("body,field", BAD_BODIES)
def test_create_and_update_refuse_bad_fields_and_store_nothing(http_server, app, body, field):
    kit = make_team(app, "rest-bad")
    api = as_key(http_server, kit.rw.key)
    r = api("POST", "/webhooks", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and r.json()["error"] == "invalid_input"
    assert kit.webhook_count() == 0
    created = api("POST", "/webhooks", json={"url": PUBLIC_URL, "events": ["scan"]}).json()
    update = (
        {k: v for k, v in body.items() if k != "url" or field == "url"}
        if field != "url"
        else {"url": body.get("url")}
    )
    if field == "url" and "url" not in body:
        return  # PUT takes only the given fields: a missing url is no change
    r = api("PUT", f"/webhooks/{created['id']}", json=update)
    assert r.status_code == 422, (update, r.text)
    assert r.json()["field"] == field
    after = api("GET", f"/webhooks/{created['id']}").json()
    assert after == {k: v for k, v in created.items() if k != "secret"}  # nothing changed


@pytest.mark.parametrize(
    "method,path,kwargs,field",
    [
        ("PUT", "/webhooks/{id}", {"json": {}}, "body"),
        (
            "PUT",
            "/webhooks/{id}",
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            "body",
        ),
        ("PUT", "/webhooks/{id}", {"json": {"active": "false"}}, "active"),
        ("PUT", "/webhooks/{id}", {"json": {"active": 1}}, "active"),
        ("PUT", "/webhooks/{id}", {"json": [1, 2]}, "body"),
        ("GET", "/webhooks/abc", {}, "webhook_id"),
        ("GET", "/webhooks/-3", {}, "webhook_id"),
        ("GET", "/webhooks/1.5", {}, "webhook_id"),
        ("GET", "/webhooks/99999999999999999999999", {}, "webhook_id"),
        ("GET", "/webhooks?limit=0", {}, "limit"),
        ("GET", "/webhooks?limit=1000", {}, "limit"),
        ("GET", "/webhooks?limit=ten", {}, "limit"),
        ("GET", "/webhooks?cursor=forged.cursor", {}, "cursor"),
        ("GET", "/webhooks/{id}/deliveries?state=done", {}, "state"),
        ("POST", "/deliveries/zero/redeliver", {}, "delivery_id"),
        ("POST", "/webhooks/{id}/rotate-secret", {"json": {"grace_seconds": -1}}, "grace_seconds"),
        ("POST", "/webhooks/{id}/rotate-secret", {"json": {"grace_seconds": 10**9}}, "grace_seconds"),
    ],
)
def test_malformed_requests_are_422_naming_the_field(http_server, app, method, path, kwargs, field):
    kit = make_team(app, "rest-422")
    api = as_key(http_server, kit.key(scopes=list(SCOPE_SETS["all"])).key)
    created = api("POST", "/webhooks", json={"url": PUBLIC_URL, "events": ["scan"]}).json()
    r = api(method, path.format(id=created["id"]), **kwargs)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field, r.json()


@pytest.mark.parametrize(
    "body,field",
    [
        ({"event": "scan2", "data": {}}, "event"),
        ({"event": "first_scan", "data": {"qr_code_id": 1, "scan_id": 1}}, "event"),
        ({"event": "scan", "data": [1]}, "data"),
        ({"event": "scan", "data": {"scan_id": 1}}, "data.qr_code_id"),
        ({"event": "scan", "data": {"qr_code_id": "1", "scan_id": 1}}, "data.qr_code_id"),
        ({"event": "scan"}, "data"),
        ({"event": "scan", "data": {}, "extra": 1}, "extra"),
    ],
)
def test_bad_events_are_422_and_record_nothing(http_server, app, body, field):
    kit = make_team(app, "rest-events")
    api = as_key(http_server, kit.key(scopes=["events:write"]).key)
    r = api("POST", "/events", json=body)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_a_body_over_1_mib_is_refused_before_parsing(http_server, app):
    kit = make_team(app, "rest-big")
    api = as_key(http_server, kit.rw.key)
    big = b'{"url": "' + b"a" * (1024 * 1024) + b'", "events": ["scan"]}'
    r = api("POST", "/webhooks", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "too_large"

    def chunks():
        yield b'{"url": "'
        for _ in range(20):
            yield b"a" * 65536
        yield b'"}'

    r = api("POST", "/webhooks", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert kit.webhook_count() == 0


# --- behaviour ------------------------------------------------------------------------------------


def test_openapi_document_needs_no_key_and_declares_bearer_scopes(http_server):
    r = httpx.get(f"{http_server.base}{API}/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.") and doc["servers"] == [{"url": API}]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    for method, template, _body, scope, _ok in ENDPOINTS:
        path = template.replace("{id}", "{webhook_id}").replace("{delivery}", "{delivery_id}")
        op = doc["paths"][path][method.lower()]
        assert op["security"] == [{"bearerAuth": [scope]}], (method, path)
    create = doc["components"]["schemas"]["WebhookCreateBody"]
    assert create["additionalProperties"] is False and create["properties"]["url"]["maxLength"] == 2048
    for guide_path in (
        "/webhooks",
        "/webhooks/{webhook_id}",
        "/webhooks/{webhook_id}/deliveries",
        "/webhooks/{webhook_id}/test",
    ):
        assert guide_path in doc["paths"]


def test_put_changes_only_given_fields_and_inactive_webhooks_receive_nothing(live, local_app, receiver):
    kit = make_team(local_app, "rest-put")
    hook = local_hook(kit, receiver, "/put", events=("scan",))
    api = as_key(live, kit.rw.key)
    r = api("PUT", f"/webhooks/{hook.id}", json={"description": "CRM", "events": ["scan", "form_submit"]})
    assert r.status_code == 200
    assert (
        r.json()["description"] == "CRM"
        and r.json()["events"] == ["scan", "form_submit"]
        and r.json()["url"] == hook.url
    )
    assert r.json()["updated_at"] > r.json()["created_at"]
    assert api("PUT", f"/webhooks/{hook.id}", json={"description": None}).json()["description"] is None
    receiver.expect("/put", *[Reply(503)] * 2)
    sent = local_app.service.emit_event(
        team_id=kit.team.id, event="scan", data={"qr_code_id": 10, "scan_id": 1}
    )
    wait_for(lambda: len(receiver.at("/put")) >= 1, what="first attempt")
    assert api("PUT", f"/webhooks/{hook.id}", json={"active": False}).json()["active"] is False
    local_app.service.emit_event(team_id=kit.team.id, event="scan", data={"qr_code_id": 10, "scan_id": 2})
    wait_for(
        lambda: api("GET", f"/webhooks/{hook.id}/deliveries?state=failed").json()["deliveries"],
        what="cancelled",
    )
    cancelled = api("GET", f"/webhooks/{hook.id}/deliveries?state=failed").json()["deliveries"]
    assert [c["id"] for c in cancelled] == sent.deliveries and "deactivated" in cancelled[0]["note"]
    # A test delivery checks the receiver whatever `active` says, and answers with its outcome.
    receiver.expect("/put", Reply(200, body=b"checked"))
    test = api("POST", f"/webhooks/{hook.id}/test")
    assert test.status_code == 200, test.text
    assert test.json()["state"] == "succeeded" and test.json()["response_body"] == "checked"
    # The scan recorded while inactive was never sent; the cancelled one was not sent again.
    assert [json.loads(r.body)["event"] for r in receiver.at("/put")] == ["scan", "test"]
    redeliver = api("POST", f"/deliveries/{sent.deliveries[0]}/redeliver")
    assert redeliver.status_code == 409 and redeliver.json()["field"] == "webhook_id"


def test_redeliver_and_rotate_secret_over_rest(live, local_app, receiver):
    from standardwebhooks import Webhook as StandardWebhook

    from tests.receiver import guide_verify

    kit = make_team(local_app, "rest-rotate")
    hook = local_hook(kit, receiver, "/rot")
    receiver.expect("/rot", *[Reply(500)] * 4)
    api = as_key(live, kit.key(scopes=list(SCOPE_SETS["all"])).key)
    r = api("POST", "/events", json={"event": "scan", "data": {"qr_code_id": 11, "scan_id": 1}})
    assert r.status_code == 202
    (original,) = r.json()["deliveries"]
    wait_for(
        lambda: api("GET", f"/webhooks/{hook.id}/deliveries?state=failed").json()["deliveries"],
        timeout=60,
        what="failed",
    )
    rotated = api("POST", f"/webhooks/{hook.id}/rotate-secret", json={"grace_seconds": 3600}).json()
    assert rotated["secret"] != hook.secret and rotated["previous_secret_expires_at"] is not None
    receiver.secrets.pop("/rot")  # verify by hand below: both secrets must work
    again = api("POST", f"/deliveries/{original}/redeliver")
    assert (
        again.status_code == 201
        and again.json()["redelivery_of"] == original
        and again.json()["state"] == "pending"
    )
    wait_for(lambda: len(receiver.at("/rot")) == 5, what="the redelivery")
    got = receiver.at("/rot")[-1]
    guide_verify(rotated["secret"], got.body, got.headers["x-webhook-signature"])  # new secret
    std_headers = {k: got.headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    assert len(std_headers["webhook-signature"].split()) == 2
    StandardWebhook(rotated["secret"]).verify(got.body, std_headers)
    StandardWebhook(hook.secret).verify(got.body, std_headers)  # the old one, during the grace period
    assert json.loads(got.body)["data"]["qr_code_id"] == 11
    log = api("GET", f"/webhooks/{hook.id}/deliveries").json()["deliveries"]
    assert log[0]["id"] == again.json()["id"] and log[0]["state"] == "succeeded"
    # Rotating again with no grace: only the newest secret signs.
    newest = api("POST", f"/webhooks/{hook.id}/rotate-secret", json={"grace_seconds": 0}).json()
    assert newest["previous_secret_expires_at"] is None
    api("POST", f"/webhooks/{hook.id}/test")
    got = receiver.at("/rot")[-1]
    assert len(got.headers["webhook-signature"].split()) == 1
    guide_verify(newest["secret"], got.body, got.headers["x-webhook-signature"])


def test_rest_and_mcp_see_the_same_state(live, local_app, receiver):
    import anyio
    from mcp import Client

    from justscan_mcp.mcp_server import build_mcp_server

    kit = make_team(local_app, "rest-mcp")
    api = as_key(live, kit.rw.key)
    made = api(
        "POST",
        "/webhooks",
        json={"url": receiver.url("/both"), "events": ["scan"], "description": f"r{uuid.uuid4().hex[:4]}"},
    ).json()

    async def via_mcp():
        async with Client(build_mcp_server(local_app, fixed_key_id=kit.rw.id)) as c:
            got = (await c.call_tool("get_webhook", {"webhook_id": made["id"]})).structured_content
            assert got == {k: v for k, v in made.items() if k != "secret"}
            upd = await c.call_tool(
                "update_webhook", {"webhook_id": made["id"], "events": ["file_download"], "active": False}
            )
            return upd.structured_content

    updated = anyio.run(via_mcp)
    assert api("GET", f"/webhooks/{made['id']}").json() == updated
    listed = api("GET", "/webhooks").json()["webhooks"]
    assert [w["events"] for w in listed] == [["file_download"]]
    assert api("DELETE", f"/webhooks/{made['id']}").status_code == 204
    assert api("GET", f"/webhooks/{made['id']}").status_code == 404

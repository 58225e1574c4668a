"""OAuth 2.1 against a real `serve --transport http`: discovery, the Python SDK's own OAuth client
through registration, consent (driven over HTTP as a browser would), tokens and tool calls; then
refresh rotation, revocation and the refusals a security reviewer checks first."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)
from pydantic import AnyUrl

from tests.conftest import PUBLIC_URL, HttpServer, TeamKit, make_team

REDIRECT = "http://127.0.0.1:47001/callback"


class Memory:
    """The SDK client's token storage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


class Person:
    """A browser driven over HTTP: follows the authorize redirect, signs in with an API key,
    approves (or denies) on the consent page, and reads where it is sent back to."""

    def __init__(
        self, server: HttpServer, key: str, *, decision: str = "approve", scopes: list[str] | None = None
    ):
        self.server = server
        self.key = key
        self.decision = decision
        self.scopes = scopes
        self.back: dict[str, str] = {}
        self.consent_html = ""

    def visit(self, authorize_url: str) -> None:
        with httpx.Client(base_url=self.server.base, follow_redirects=False, timeout=10) as b:
            r = b.get(authorize_url)
            assert r.status_code == 302, r.text
            consent = r.headers["location"]
            assert consent.startswith(f"{self.server.base}/oauth/consent?request=")
            r = b.get(consent)  # no session cookie yet: the page loads itself again from this origin
            assert 'http-equiv="refresh"' in r.text
            r = b.get(consent + "&again=1")
            assert "Sign in" in r.text and 'name="next"' in r.text
            csrf = _field(r.text, "csrf")
            r = b.post("/login", data={"csrf": csrf, "api_key": self.key, "next": _field(r.text, "next")})
            assert r.status_code == 303 and r.headers["location"].startswith("/oauth/consent?request="), (
                r.text
            )
            r = b.get(r.headers["location"])
            assert r.status_code == 200, r.text
            self.consent_html = r.text
            offered = [s for s in ("webhooks:read", "webhooks:write") if f'value="{s}"' in r.text]
            form = {
                "csrf": _field(r.text, "csrf"),
                "request": _field(r.text, "request"),
                "decision": self.decision,
                "scopes": self.scopes if self.scopes is not None else offered,
            }
            r = b.post("/oauth/consent", data=form)
            assert r.status_code == 303, r.text
            sent = urlsplit(r.headers["location"])
            assert f"{sent.scheme}://{sent.netloc}{sent.path}" == REDIRECT
            self.back = {k: v[0] for k, v in parse_qs(sent.query).items()}


def _field(html: str, name: str) -> str:
    import re

    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found, f"no {name} field"
    return found.group(1).replace("&amp;", "&")


def sdk_client(server: HttpServer, person: Person, storage: Memory) -> Client:
    async def redirect(url: str) -> None:
        await anyio.to_thread.run_sync(person.visit, url)

    async def callback() -> AuthorizationCodeResult:
        return AuthorizationCodeResult(
            code=person.back["code"], state=person.back.get("state"), iss=person.back.get("iss")
        )

    provider = OAuthClientProvider(
        server_url=f"{server.base}/mcp",
        client_metadata=OAuthClientMetadata(
            client_name="Test assistant",
            redirect_uris=[AnyUrl(REDIRECT)],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        ),
        storage=storage,
        redirect_handler=redirect,
        callback_handler=callback,
    )
    hc = httpx2.AsyncClient(auth=provider, timeout=30)
    return Client(streamable_http_client(f"{server.base}/mcp", http_client=hc))


@pytest.fixture
def kit_http(http_server: HttpServer, app) -> Iterator[TeamKit]:
    yield make_team(app, "oauth-http")


def test_discovery_documents_and_the_401_that_points_at_them(http_server: HttpServer):
    r = httpx.post(f"{http_server.base}/mcp", json={}, timeout=10)
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    meta_url = f"{http_server.base}/.well-known/oauth-protected-resource"
    assert (
        f'resource_metadata="{meta_url}"' in challenge and 'scope="webhooks:read webhooks:write"' in challenge
    )
    assert "error=" not in challenge  # no credentials: RFC 6750 leaves the error code out
    bad = httpx.post(
        f"{http_server.base}/mcp", json={}, headers={"Authorization": "Bearer jsat_" + "x" * 40}, timeout=10
    )
    assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["www-authenticate"]
    assert f'resource_metadata="{meta_url}"' in bad.headers["www-authenticate"]
    sse = httpx.get(f"{http_server.base}/sse", timeout=10)
    assert sse.status_code == 401 and f'resource_metadata="{meta_url}"' in sse.headers["www-authenticate"]
    prm = httpx.get(meta_url, timeout=10).json()
    assert prm["resource"] == f"{http_server.base}/mcp" and prm["authorization_servers"] == [http_server.base]
    assert httpx.get(f"{meta_url}/mcp", timeout=10).json() == prm
    asm = httpx.get(f"{http_server.base}/.well-known/oauth-authorization-server", timeout=10).json()
    assert asm["issuer"] == http_server.base  # exactly what `iss` on the redirect back says
    assert asm["code_challenge_methods_supported"] == ["S256"]
    assert asm["registration_endpoint"] == f"{http_server.base}/register"
    assert {"authorization_code", "refresh_token"} <= set(asm["grant_types_supported"])
    assert r.headers.get("content-type", "").startswith("application/json")


def test_the_python_sdk_client_connects_with_a_sign_in_and_a_consent_click(
    http_server: HttpServer, kit_http: TeamKit
):
    kit = kit_http
    person = Person(http_server, kit.rw.key, scopes=["webhooks:read"])
    storage = Memory()

    async def scenario() -> tuple[list[str], Any, Any]:
        async with sdk_client(http_server, person, storage) as c:
            tools = sorted(t.name for t in (await c.list_tools()).tools)
            listed = await c.call_tool("list_webhooks", {})
            refused = await c.call_tool("create_webhook", {"url": PUBLIC_URL, "events": ["scan"]})
            return tools, listed, refused

    tools, listed, refused = anyio.run(scenario)
    # Read-only was approved: only the read tools are listed, and a write is refused naming the scope.
    assert "create_webhook" not in tools and "list_webhooks" in tools
    assert listed.is_error is False and listed.structured_content["webhooks"] == []
    assert refused.is_error and "webhooks:write" in refused.content[0].text
    assert "Test assistant" in person.consent_html and "127.0.0.1:47001" in person.consent_html
    assert person.back["iss"] == http_server.base
    assert storage.tokens is not None and storage.tokens.access_token.startswith("jsat_")
    assert storage.client is not None and storage.client.client_id
    # Listed under Connected apps.
    (connected,) = kit.app.service.connected_apps(team_id=kit.team.id)
    assert connected["client_name"] == "Test assistant" and connected["scopes"] == ["webhooks:read"]


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


def _register(server: HttpServer) -> str:
    r = httpx.post(
        f"{server.base}/register",
        json={"redirect_uris": [REDIRECT], "client_name": "Raw client", "token_endpoint_auth_method": "none"},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return r.json()["client_id"]


def _authorize_url(server: HttpServer, client_id: str, challenge: str, **extra: str) -> str:
    q = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "s-1",
        "resource": f"{server.base}/mcp",
    } | extra
    return f"/authorize?{urlencode(q)}"


def _redeem(server: HttpServer, client_id: str, code: str, verifier: str) -> httpx.Response:
    """The token endpoint's authorization-code grant, as a public client sends it."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": client_id,
        "code_verifier": verifier,
    }
    return httpx.post(f"{server.base}/token", data=form, timeout=10)


def _code_flow(server: HttpServer, key: str) -> tuple[str, dict[str, Any]]:
    client_id = _register(server)
    verifier, challenge = _pkce()
    person = Person(server, key)
    person.visit(_authorize_url(server, client_id, challenge))
    assert person.back["state"] == "s-1"
    r = _redeem(server, client_id, person.back["code"], verifier)
    assert r.status_code == 200, r.text
    return client_id, r.json() | {"code": person.back["code"], "verifier": verifier}


def _mcp_status(server: HttpServer, token: str) -> httpx.Response:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    return httpx.post(
        f"{server.base}/mcp",
        json=init,
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"},
        timeout=10,
    )


def test_refresh_rotates_and_reuse_revokes_the_grant(http_server: HttpServer, kit_http: TeamKit):
    client_id, first = _code_flow(http_server, kit_http.rw.key)
    assert _mcp_status(http_server, first["access_token"]).status_code == 200

    def refresh(token: str) -> httpx.Response:
        return httpx.post(
            f"{http_server.base}/token",
            data={"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id},
            timeout=10,
        )

    second = refresh(first["refresh_token"])
    assert second.status_code == 200 and second.json()["refresh_token"] != first["refresh_token"]
    again = refresh(first["refresh_token"])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    # The reuse revoked the grant: the newest access token is dead too.
    dead = _mcp_status(http_server, second.json()["access_token"])
    assert dead.status_code == 401 and "resource_metadata=" in dead.headers["www-authenticate"]


def test_a_code_used_twice_is_refused_and_kills_its_tokens(http_server: HttpServer, kit_http: TeamKit):
    client_id, first = _code_flow(http_server, kit_http.rw.key)
    r = _redeem(http_server, client_id, first["code"], first["verifier"])
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert _mcp_status(http_server, first["access_token"]).status_code == 401


def test_a_bad_verifier_plain_pkce_a_foreign_redirect_and_another_audience_are_refused(
    http_server: HttpServer,
):
    client_id = _register(http_server)
    verifier, challenge = _pkce()
    with httpx.Client(base_url=http_server.base, follow_redirects=False, timeout=10) as b:
        plain = b.get(_authorize_url(http_server, client_id, verifier, code_challenge_method="plain"))
        assert plain.status_code == 302 and "error=invalid_request" in plain.headers["location"]
        foreign = b.get(
            _authorize_url(http_server, client_id, challenge, redirect_uri="https://evil.example/cb")
        )
        assert foreign.status_code == 400 and foreign.json()["error"] == "invalid_request"
        other = b.get(_authorize_url(http_server, client_id, challenge, resource="https://other.example/mcp"))
        assert other.status_code == 302 and "error=invalid_target" in other.headers["location"]
        # A loopback redirect on another port is the same native app (RFC 8252).
        port = b.get(
            _authorize_url(http_server, client_id, challenge, redirect_uri="http://127.0.0.1:5999/callback")
        )
        assert port.status_code == 302 and "/oauth/consent?request=" in port.headers["location"]


def test_a_wrong_code_verifier_is_invalid_grant(http_server: HttpServer, kit_http: TeamKit):
    client_id = _register(http_server)
    verifier, challenge = _pkce()
    person = Person(http_server, kit_http.rw.key)
    person.visit(_authorize_url(http_server, client_id, challenge))
    r = _redeem(http_server, client_id, person.back["code"], verifier + "x")
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


def test_denying_sends_access_denied_back_and_issues_nothing(http_server: HttpServer, kit_http: TeamKit):
    client_id = _register(http_server)
    _, challenge = _pkce()
    person = Person(http_server, kit_http.rw.key, decision="deny")
    person.visit(_authorize_url(http_server, client_id, challenge))
    assert (
        person.back["error"] == "access_denied"
        and person.back["state"] == "s-1"
        and "code" not in person.back
    )
    assert kit_http.app.service.connected_apps(team_id=kit_http.team.id) == []


def test_scopes_beyond_the_key_are_refused_on_the_consent_page(http_server: HttpServer, kit_http: TeamKit):
    reader = kit_http.key(scopes=["webhooks:read"])
    client_id = _register(http_server)
    _, challenge = _pkce()
    person = Person(http_server, reader.key, scopes=["webhooks:read", "webhooks:write"])
    with pytest.raises(AssertionError):
        person.visit(_authorize_url(http_server, client_id, challenge))
    assert 'value="webhooks:write"' not in person.consent_html  # never offered
    assert kit_http.app.service.connected_apps(team_id=kit_http.team.id) == []


def test_revoking_the_key_or_switching_off_its_mcp_stops_the_token(
    http_server: HttpServer, kit_http: TeamKit
):
    key = kit_http.key()
    _, tokens = _code_flow(http_server, key.key)
    assert _mcp_status(http_server, tokens["access_token"]).status_code == 200
    kit_http.app.service.update_api_key(key_id=key.id, mcp_enabled=False)
    assert _mcp_status(http_server, tokens["access_token"]).status_code == 403
    kit_http.app.service.update_api_key(key_id=key.id, mcp_enabled=True)
    kit_http.app.service.revoke_api_key(key_id=key.id)
    gone = _mcp_status(http_server, tokens["access_token"])
    assert gone.status_code == 401 and "resource_metadata=" in gone.headers["www-authenticate"]


def test_connected_apps_lists_and_revokes_and_sign_in_never_redirects_elsewhere(
    http_server: HttpServer, kit_http: TeamKit
):
    _, tokens = _code_flow(http_server, kit_http.rw.key)
    with httpx.Client(base_url=http_server.base, follow_redirects=False, timeout=10) as b:
        form = b.get("/login")
        r = b.post(
            "/login",
            data={
                "csrf": _field(form.text, "csrf"),
                "api_key": kit_http.rw.key,
                "next": "https://evil.example/x",
            },
        )
        assert r.status_code == 303 and r.headers["location"] == "/webhooks"  # not an open redirect
        page = b.get("/apps")
        assert "Raw client" in page.text and "webhooks:read, webhooks:write" in page.text
        grant = int(page.text.split('data-grant="')[1].split('"')[0])
        r = b.post(f"/apps/{grant}/revoke", data={"csrf": _field(page.text, "csrf")})
        assert r.status_code == 303 and "app-revoked" in r.headers["location"]
        assert "No connected apps" in b.get("/apps").text
    assert _mcp_status(http_server, tokens["access_token"]).status_code == 401


def test_a_forged_or_spent_consent_request_is_refused_clearly(http_server: HttpServer, kit_http: TeamKit):
    with httpx.Client(base_url=http_server.base, follow_redirects=False, timeout=10) as b:
        form = b.get("/login")
        b.post("/login", data={"csrf": _field(form.text, "csrf"), "api_key": kit_http.rw.key})
        page = b.get("/oauth/consent?request=forged-handle")
        assert page.status_code == 404 and "expired" in page.text
        csrf = _field(b.get("/apps").text, "csrf")
        r = b.post("/oauth/consent", data={"csrf": csrf, "request": "forged-handle", "decision": "approve"})
        assert r.status_code == 404 and "expired" in r.text
        # A real request, approved once, cannot be approved again (a replayed form).
        client_id = _register(http_server)
        _, challenge = _pkce()
        consent = b.get(_authorize_url(http_server, client_id, challenge)).headers["location"]
        html = b.get(consent).text
        data = {
            "csrf": _field(html, "csrf"),
            "request": _field(html, "request"),
            "decision": "approve",
            "scopes": ["webhooks:read"],
        }
        assert b.post("/oauth/consent", data=data).status_code == 303
        assert b.post("/oauth/consent", data=data).status_code == 404

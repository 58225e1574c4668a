"""OAuth client ID metadata documents: a client known by the URL of its JSON. Fetched under the
webhook address rules, size-limited, and the flow works end to end with one; a document on a
private address is refused before any connection is made."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from justscan_mcp.client_documents import DOCUMENT_LIMIT, fetch_client_document
from justscan_mcp.errors import InvalidInput
from justscan_mcp.targets import system_resolver
from tests.conftest import HttpServer, TeamKit, child_env, spawn_server
from tests.test_oauth_http import REDIRECT, Person, _authorize_url, _mcp_status, _pkce, _redeem


class Documents:
    """A tiny web server of client metadata documents on 127.0.0.1 (path -> (status, body))."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[int, bytes]] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                status, body = outer.pages.get(self.path, (404, b"{}"))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def publish(
        self, path: str, document: dict | None = None, *, status: int = 200, raw: bytes | None = None
    ) -> str:
        url = self.url(path)
        body = (
            raw
            if raw is not None
            else json.dumps(document if document is not None else self.document(url)).encode()
        )
        self.pages[path] = (status, body)
        return url

    @staticmethod
    def document(url: str) -> dict:
        return {
            "client_id": url,
            "client_name": "Documented assistant",
            "redirect_uris": [REDIRECT],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }


@pytest.fixture
def documents() -> Iterator[Documents]:
    docs = Documents()
    yield docs
    docs.server.shutdown()


def fetch(url: str) -> dict:
    return fetch_client_document(url, allow_private=True, resolve=system_resolver)


def test_a_document_is_read_and_checked(documents: Documents):
    good = documents.publish("/good.json")
    assert fetch(good)["client_name"] == "Documented assistant"
    cases = {
        documents.publish(
            "/other.json", Documents.document("https://elsewhere.example/c.json")
        ): "another client_id",
        documents.publish("/missing.json", status=404): "HTTP 404",
        documents.publish("/big.json", raw=b'{"x": "' + b"a" * DOCUMENT_LIMIT + b'"}'): "over",
        documents.publish("/list.json", raw=b"[1, 2]"): "not a JSON object",
        documents.publish("/text.json", raw=b"hello"): "not JSON",
        documents.publish(
            "/secret.json",
            {
                **Documents.document(documents.url("/secret.json")),
                "token_endpoint_auth_method": "client_secret_post",
            },
        ): "no secret",
        documents.publish(
            "/nouris.json", {**Documents.document(documents.url("/nouris.json")), "redirect_uris": []}
        ): "redirect_uris",
    }
    for url, words in cases.items():
        with pytest.raises(InvalidInput) as err:
            fetch(url)
        assert err.value.field == "client_id" and words in err.value.reason, (url, err.value.reason)


def test_a_private_address_is_refused_before_any_connection(documents: Documents):
    url = documents.publish("/private.json")
    with pytest.raises(InvalidInput) as err:
        fetch_client_document(
            url.replace("http://", "https://"), allow_private=False, resolve=system_resolver
        )
    assert err.value.field == "client_id" and "127.0.0.1" in err.value.reason
    with pytest.raises(InvalidInput):
        fetch_client_document(url, allow_private=False, resolve=system_resolver)  # and plain http
    assert documents.requests == []


def test_the_strict_server_refuses_a_private_document_at_authorize(
    http_server: HttpServer, documents: Documents
):
    url = documents.publish("/strict.json").replace("http://", "https://")
    _, challenge = _pkce()
    r = httpx.get(f"{http_server.base}{_authorize_url(http_server, url, challenge)}", timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert documents.requests == []
    meta = httpx.get(f"{http_server.base}/.well-known/oauth-authorization-server", timeout=10).json()
    assert meta["client_id_metadata_document_supported"] is True


def test_the_whole_flow_with_a_documented_client(
    db_url: str, kit: TeamKit, documents: Documents, tmp_path: Path
):
    env = child_env(db_url, JUSTSCAN_ALLOW_PRIVATE_TARGETS="1")
    with spawn_server(env, tmp_path / "server.log", "--no-dispatcher") as server:
        client_id = documents.publish("/assistant.json")
        verifier, challenge = _pkce()
        person = Person(server, kit.rw.key)
        person.visit(_authorize_url(server, client_id, challenge))
        assert "Documented assistant" in person.consent_html
        r = _redeem(server, client_id, person.back["code"], verifier)
        assert r.status_code == 200, r.text
        assert _mcp_status(server, r.json()["access_token"]).status_code == 200
        fetched = len(documents.requests)
        assert fetched == 1  # kept after the first fetch (authorize, consent and token all read it)
    (app,) = kit.app.service.connected_apps(team_id=kit.team.id)
    assert app["client_id"] == client_id and app["client_name"] == "Documented assistant"

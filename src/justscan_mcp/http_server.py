"""The HTTP process: MCP, the REST API, the dashboard and the probes on one port, one lifespan.

MCP over streamable HTTP (`/mcp`) and SSE (`/sse`, `/messages/`), the REST API (`/api/v1`), the
dashboard (`/`) and `/healthz`, `/readyz` and `/metrics` (probes.py), sharing the process lifespan of `App`, behind the bearer-key layer
and the body limits.

Bearer keys are checked here, before the SDK sees a request, because SPEC wants two different
answers the SDK's verifier cannot give: 401 for no, unknown or revoked keys, 403 with a reason
for a key whose MCP switch is off. An accepted key is handed to the SDK as its `AuthenticatedUser`,
so the SDK's session-ownership checks and `get_access_token()` keep working.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from justscan_mcp.app import App
from justscan_mcp.errors import McpDisabled, StoreUnavailable, Unauthenticated
from justscan_mcp.mcp_server import authenticated_for_request, build_mcp_server
from justscan_mcp.models import Principal, UncheckedKey
from justscan_mcp.oauth_server import MCP_SCOPES, oauth_routes, resource_metadata_url, resource_url
from justscan_mcp.probes import probe_routes
from justscan_mcp.rest_api import API_PREFIX
from justscan_mcp.service.oauth import looks_like_access_token
from justscan_mcp.threads import in_thread

log = logging.getLogger("justscan_mcp.http")

SSE_MESSAGES = "/messages"
MCP_STREAMABLE = "/mcp"
MCP_PATHS = (MCP_STREAMABLE, "/sse", SSE_MESSAGES)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def transport_security(bind_host: str, port: int, extra_hosts: Sequence[str]) -> TransportSecuritySettings:
    """Host/Origin allow-lists against DNS rebinding: loopback names on any port (a loopback name
    cannot be rebound, and SSH tunnels and port-forwards reach the server as `localhost:<their
    port>`), the bind address on its port, and any public host names the operator allows
    (deployments behind a proxy)."""
    hosts: list[str] = []
    origins: list[str] = []
    for name in LOCAL_HOSTS:
        hosts += [name, f"{name}:*"]
        origins += [f"http://{name}", f"https://{name}", f"http://{name}:*", f"https://{name}:*"]
    if bind_host not in ("0.0.0.0", "::", "", *LOCAL_HOSTS):  # noqa: S104 - comparing, not binding
        name = f"[{bind_host}]" if ":" in bind_host else bind_host
        hosts += [name, f"{name}:{port}"]
        origins += [f"http://{name}:{port}", f"https://{name}:{port}"]
    for extra in extra_hosts:
        hosts.append(extra if ":" in extra else f"{extra}:*")
        if ":" not in extra:
            hosts.append(extra)
        origins += [f"https://{extra}", f"http://{extra}"]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


def _json(
    status: int,
    error: str,
    description: str,
    *,
    www_auth: bool = False,
    metadata: str | None = None,
    presented: bool = True,
) -> JSONResponse:
    headers = {}
    if www_auth:
        # Header values are latin-1 and quoted: keep the reason printable ASCII without quotes.
        safe = description.encode("ascii", "replace").decode().replace('"', "'")
        params = []
        # With no credentials at all, RFC 6750 §3.1 leaves the error code out of the challenge.
        if presented:
            params += [f'error="{error}"', f'error_description="{safe}"']
        if metadata:
            # Where an OAuth client finds the authorization server (RFC 9728 §5.1), and the
            # scopes to ask for.
            params += [f'resource_metadata="{metadata}"', f'scope="{" ".join(MCP_SCOPES)}"']
        challenge = "Bearer " + ", ".join(params) if params else "Bearer"
        headers["WWW-Authenticate"] = challenge
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=headers
    )


class BearerKeyAuth:
    """ASGI middleware: authenticate the API key or OAuth access token on every MCP request
    (401 / 403 with a reason; a 401 names the OAuth resource metadata)."""

    def __init__(self, app: ASGIApp, *, justscan: App, metadata_url: str | None = None) -> None:
        self.app = app
        self.justscan = justscan
        self.service = justscan.service
        self.metadata_url = metadata_url

    def _caller(self, raw: str, path: str) -> tuple[Principal | UncheckedKey, int | None]:
        """The caller of a bearer credential and, for an OAuth token, its grant.

        Raises:
            Unauthenticated, McpDisabled.
        """
        if looks_like_access_token(raw):
            holder = self.service.verify_access_token(raw)
            if holder is None:
                raise Unauthenticated(
                    "the access token is unknown, expired or revoked; refresh it or sign in again"
                )
            principal = self.service.principal_for_grant(holder.grant_id)
            if not path.startswith(SSE_MESSAGES):
                self.service.require_mcp(principal)
            return principal, holder.grant_id
        if path.startswith(SSE_MESSAGES):
            # A message for an open SSE session: an HTTP refusal here would only reach the
            # client's log and leave its call waiting forever. Identify the key (unknown: 401)
            # and let the MCP gate, which re-reads the key for every request (revoked, MCP
            # off), answer on the stream with the reason; the SDK refuses a message for a
            # session another key opened.
            return self.service.identify_key(raw or None), None
        caller = self.service.authenticate(raw or None)
        self.service.require_mcp(caller)
        return caller, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(MCP_PATHS):
            await self.app(scope, receive, send)
            return
        if not self.justscan.ready:
            await _json(503, "unavailable", StoreUnavailable.PUBLIC)(scope, receive, send)
            return
        header = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        scheme, _, raw_key = header.partition(" ")
        raw_key = raw_key.strip() if scheme.lower() == "bearer" else ""
        try:
            caller, grant_id = await in_thread(self._caller, raw_key, scope["path"])
        except Unauthenticated as exc:
            await _json(
                401,
                "invalid_token",
                exc.message,
                www_auth=True,
                metadata=self.metadata_url,
                presented=bool(raw_key),
            )(scope, receive, send)
            return
        except McpDisabled as exc:
            await _json(403, "mcp_disabled", exc.message)(scope, receive, send)
            return
        except StoreUnavailable:
            await _json(503, "unavailable", StoreUnavailable.PUBLIC)(scope, receive, send)
            return
        # The AccessToken never carries the key itself: only its id, so nothing secret can leak from it.
        ident = f"key-{caller.key_id}"
        scopes = sorted(caller.scopes) if isinstance(caller, Principal) else []
        claims: dict[str, Any] = {"key_id": caller.key_id}
        if grant_id is not None:
            # The session belongs to the grant: a token of another app acting through the same
            # key must not reach it.
            ident = f"grant-{grant_id}"
            claims["grant_id"] = grant_id
        token = AccessToken(token=ident, client_id=ident, scopes=scopes, claims=claims)
        user = AuthenticatedUser(token)
        scope["user"] = user
        scope["auth"] = AuthCredentials(token.scopes)
        reset = auth_context_var.set(user)
        # Streamable HTTP: this request's messages are answered within it, so what was checked
        # above is what the MCP gate would read again. Not for SSE: its messages are identified
        # only (above), and its long-lived stream is not the request that carries them.
        fresh = (
            caller if isinstance(caller, Principal) and scope["path"].rstrip("/") == MCP_STREAMABLE else None
        )
        reset_fresh = authenticated_for_request.set(fresh)
        try:
            await self.app(scope, receive, send)
        finally:
            authenticated_for_request.reset(reset_fresh)
            auth_context_var.reset(reset)


MAX_BODY = 1024 * 1024
MAX_FORM_BODY = 64 * 1024  # the dashboard's forms, some of them open to anyone (sign-in)
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class BodyLimit:
    """Refuse request bodies over the limit before anything parses them, on every route: 1 MiB
    for the REST API and MCP, 64 KiB for the dashboard's forms. At once when Content-Length
    says so, and by counting when the body is chunked."""

    def __init__(self, app: ASGIApp, *, limit: int = MAX_BODY, form_limit: int = MAX_FORM_BODY) -> None:
        self.app = app
        self.api_limit = limit
        self.form_limit = form_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _NO_BODY_METHODS:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = self.api_limit if path.startswith((API_PREFIX, *MCP_PATHS)) else self.form_limit
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._refuse(limit, scope, receive, send)
                return
        # Read the body here (never more than limit + 1 bytes), then replay it to the app: a
        # chunked body over the limit is refused before any parser sees it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(limit, scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        from justscan_mcp.rest_api import error_response

        await error_response(413, "too_large", f"the request body is over {limit} bytes", "body")(
            scope, receive, send
        )


def default_public_url(host: str, port: int) -> str:
    """http://HOST:PORT, with a wildcard bind address read as loopback (no client can reach
    0.0.0.0); behind a proxy, set JUSTSCAN_PUBLIC_URL instead."""
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - comparing, not binding
        host = "127.0.0.1"
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{name}:{port}"


def build_http_app(
    app: App,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    allowed_hosts: Sequence[str] = (),
    dispatcher: bool = True,
) -> Starlette:
    """The ASGI app of `serve --transport http`."""
    public_url = app.settings.public_url or default_public_url(host, port)
    app.service.oauth_resource = resource_url(public_url)
    mcp = build_mcp_server(app, timed=True)
    security = transport_security(host, port, [*app.settings.allowed_hosts, *allowed_hosts])
    streamable = mcp.streamable_http_app(
        streamable_http_path=MCP_STREAMABLE, transport_security=security, host=host
    )
    sse = mcp.sse_app(sse_path="/sse", message_path="/messages/", transport_security=security, host=host)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with app.lifespan(dispatcher=dispatcher), mcp.session_manager.run():
            log.info("ready")
            yield {}

    from justscan_mcp.dashboard import build_dashboard
    from justscan_mcp.rest_api import FastIngest, build_rest_api

    routes: list[BaseRoute] = [
        *probe_routes(app),
        Mount(API_PREFIX, app=FastIngest(build_rest_api(app), app)),
        *streamable.routes,
        *sse.routes,
        *oauth_routes(app, public_url),
        *build_dashboard(app),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        from justscan_mcp.rest_api import http_error_response

        return http_error_response(getattr(exc, "status_code", 404))

    starlette = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found}
    )
    starlette.add_middleware(BearerKeyAuth, justscan=app, metadata_url=resource_metadata_url(public_url))
    starlette.add_middleware(BodyLimit)
    return starlette

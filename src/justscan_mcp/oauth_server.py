"""OAuth 2.1 on the HTTP server: discovery, registration, authorize, token, revoke (SDK handlers).

The MCP SDK's `mcp.server.auth` handlers speak the protocol (request parsing, PKCE S256 check,
redirect-URI match between authorize and token, RFC 6749 error bodies); this module adapts them
to the service's use cases. Two things differ from the SDK's defaults:
- client secrets are stored hashed, so client authentication compares hashes (`HashedSecrets`);
- a registered loopback redirect URI matches on any port (RFC 8252 §7.3), other URIs exactly.

The consent step is the dashboard's (`/oauth/consent`): `authorize` keeps the checked request and
sends the person there.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from mcp.server.auth.handlers.authorize import AuthorizationHandler
from mcp.server.auth.handlers.metadata import MetadataHandler, ProtectedResourceMetadataHandler
from mcp.server.auth.handlers.register import RegistrationHandler
from mcp.server.auth.handlers.revoke import RevocationHandler
from mcp.server.auth.handlers.token import TokenHandler
from mcp.server.auth.middleware.client_auth import AuthenticationError, ClientAuthenticator
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    AuthorizeError,
    RefreshToken,
    TokenError,
)
from mcp.server.auth.routes import build_metadata, cors_middleware
from mcp.server.auth.settings import ClientRegistrationOptions, RevocationOptions
from mcp.shared.auth import (
    InvalidRedirectUriError,
    OAuthClientInformationFull,
    OAuthMetadata,
    OAuthToken,
    ProtectedResourceMetadata,
)
from pydantic import AnyHttpUrl, AnyUrl
from starlette.requests import Request
from starlette.routing import Route

from justscan_mcp.app import App
from justscan_mcp.config import LOOPBACK_NAMES
from justscan_mcp.errors import OAuthRefused
from justscan_mcp.security import hash_api_key as secret_hash
from justscan_mcp.service.oauth import CodeGrant, RefreshGrant, TokenPair
from justscan_mcp.threads import in_thread

MCP_SCOPES = ["webhooks:read", "webhooks:write"]
RESOURCE_METADATA_PATH = "/.well-known/oauth-protected-resource"
CONSENT_PATH = "/oauth/consent"


class Client(OAuthClientInformationFull):
    """A client as the handlers see it; `secret_hash` stays on the server."""

    secret_hash: str | None = None

    def validate_redirect_uri(self, redirect_uri: AnyUrl | None) -> AnyUrl:
        """Exact match, except that a registered loopback URI matches on any port (RFC 8252:
        native apps listen on a port the system gives them)."""
        if redirect_uri is not None and self.redirect_uris and redirect_uri not in self.redirect_uris:
            asked = urlsplit(str(redirect_uri))
            for known in self.redirect_uris:
                mine = urlsplit(str(known))
                if (
                    asked.scheme == "http"
                    and mine.scheme == "http"
                    and (asked.hostname or "") in LOOPBACK_NAMES
                    and asked.hostname == mine.hostname
                    and asked.path == mine.path
                    and asked.query == mine.query
                ):
                    return redirect_uri
            raise InvalidRedirectUriError(f"Redirect URI '{redirect_uri}' not registered for client")
        return super().validate_redirect_uri(redirect_uri)


class Code(AuthorizationCode):
    grant_id: int


class Refresh(RefreshToken):
    grant_id: int


class Provider:
    """`OAuthAuthorizationServerProvider` over the service (each call in a worker thread)."""

    def __init__(self, app: App, public_url: str) -> None:
        self.service = app.service
        self.public_url = public_url

    async def get_client(self, client_id: str) -> Client | None:
        found = await in_thread(self.service.oauth_client, client_id)
        if found is None:
            return None
        document, hashed = found
        return Client.model_validate(
            {**document, "client_id": client_id, "secret_hash": hashed, "client_secret": None}
        )

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        document = client_info.model_dump(mode="json", exclude_none=True)
        await in_thread(
            self.service.register_oauth_client,
            client_id=client_info.client_id,
            document=document,
            secret=client_info.client_secret,
        )

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        request = {
            "state": params.state,
            "scopes": params.scopes or [],
            "code_challenge": params.code_challenge,
            "redirect_uri": str(params.redirect_uri),
            "redirect_uri_explicit": params.redirect_uri_provided_explicitly,
            "resource": params.resource,
        }
        try:
            handle = await in_thread(
                self.service.begin_authorization, client_id=client.client_id, request=request
            )
        except OAuthRefused as exc:
            raise AuthorizeError(exc.error, exc.message) from exc  # type: ignore[arg-type]
        return f"{self.public_url}{CONSENT_PATH}?request={handle}"

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> Code | None:
        grant: CodeGrant | None = await in_thread(
            self.service.load_code, client_id=client.client_id, code=authorization_code
        )
        if grant is None:
            return None
        return Code(
            code=authorization_code,
            scopes=grant.scopes,
            expires_at=grant.expires_at.timestamp(),
            client_id=grant.client_id,
            code_challenge=grant.code_challenge,
            redirect_uri=AnyUrl(grant.redirect_uri),
            redirect_uri_provided_explicitly=grant.redirect_uri_explicit,
            resource=grant.resource,
            grant_id=grant.grant_id,
        )

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: Code
    ) -> OAuthToken:
        grant = CodeGrant(
            client_id=authorization_code.client_id,
            grant_id=authorization_code.grant_id,
            code_challenge=authorization_code.code_challenge,
            redirect_uri=str(authorization_code.redirect_uri),
            redirect_uri_explicit=authorization_code.redirect_uri_provided_explicitly,
            scopes=authorization_code.scopes,
            resource=authorization_code.resource or "",
            expires_at=_never(),
        )
        try:
            pair = await in_thread(self.service.redeem_code, code=authorization_code.code, grant=grant)
        except OAuthRefused as exc:
            raise TokenError(exc.error, exc.message) from exc  # type: ignore[arg-type]
        return _token(pair)

    async def load_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: str
    ) -> Refresh | None:
        grant: RefreshGrant | None = await in_thread(
            self.service.load_refresh, client_id=client.client_id, token=refresh_token
        )
        if grant is None:
            return None
        return Refresh(
            token=refresh_token,
            client_id=grant.client_id,
            scopes=grant.scopes,
            expires_at=int(grant.expires_at.timestamp()),
            resource=grant.resource,
            grant_id=grant.grant_id,
        )

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: Refresh, scopes: list[str]
    ) -> OAuthToken:
        grant = RefreshGrant(
            client_id=refresh_token.client_id,
            grant_id=refresh_token.grant_id,
            scopes=refresh_token.scopes,
            resource=refresh_token.resource or "",
            expires_at=_never(),
        )
        try:
            pair = await in_thread(
                self.service.rotate_refresh, token=refresh_token.token, grant=grant, scopes=scopes
            )
        except OAuthRefused as exc:
            raise TokenError(exc.error, exc.message) from exc  # type: ignore[arg-type]
        return _token(pair)

    async def load_access_token(self, token: str) -> AccessToken | None:
        holder = await in_thread(self.service.verify_access_token, token)
        if holder is None:
            return None
        return AccessToken(
            token=f"grant-{holder.grant_id}",
            client_id=holder.client_id,
            scopes=holder.scopes,
            expires_at=int(holder.expires_at.timestamp()),
            resource=holder.resource,
            claims={"grant_id": holder.grant_id},
        )

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        """RFC 7009: revoking either token ends the whole grant (its other tokens too)."""
        grant_id = getattr(token, "grant_id", None) or (getattr(token, "claims", None) or {}).get("grant_id")
        if isinstance(grant_id, int):
            await in_thread(self.service.revoke_connected_app, grant_id=grant_id, team_id=None)


def _never() -> Any:
    from datetime import UTC, datetime

    return datetime.max.replace(tzinfo=UTC)


def _token(pair: TokenPair) -> OAuthToken:
    return OAuthToken(
        access_token=pair.access_token,
        expires_in=pair.expires_in,
        scope=" ".join(pair.scopes),
        refresh_token=pair.refresh_token,
    )


class HashedSecrets(ClientAuthenticator):
    """Client authentication at the token and revocation endpoints against the stored hash of
    the client's secret (the SDK's compares plain secrets)."""

    async def authenticate_request(self, request: Request) -> OAuthClientInformationFull:
        form = await request.form()
        client_id = form.get("client_id")
        header = request.headers.get("Authorization", "")
        presented: str | None = None
        if header.startswith("Basic "):
            try:
                basic_id, _, secret = base64.b64decode(header[6:]).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError, binascii.Error):
                raise AuthenticationError("Invalid Basic authentication header") from None
            if client_id and unquote(basic_id) != client_id:
                raise AuthenticationError("Client ID mismatch in Basic auth")
            client_id, presented = unquote(basic_id), unquote(secret)
        elif isinstance(form.get("client_secret"), str):
            presented = str(form.get("client_secret"))
        if not isinstance(client_id, str) or not client_id:
            raise AuthenticationError("Missing client_id")
        client = await self.provider.get_client(client_id)
        if not isinstance(client, Client):
            raise AuthenticationError("Invalid client_id")
        if client.secret_hash is not None:
            if not presented or not hmac.compare_digest(secret_hash(presented), client.secret_hash):
                raise AuthenticationError("Invalid client_secret")
            if client.client_secret_expires_at and client.client_secret_expires_at < int(time.time()):
                raise AuthenticationError("Client secret has expired")
        return client


def resource_url(public_url: str) -> str:
    """What tokens are issued for: the MCP endpoint's public URL."""
    return f"{public_url}/mcp"


def resource_metadata_url(public_url: str) -> str:
    return f"{public_url}{RESOURCE_METADATA_PATH}"


def oauth_routes(app: App, public_url: str) -> list[Route]:
    """Discovery (RFC 8414, RFC 9728), registration (RFC 7591), authorize, token and revoke."""
    provider = Provider(app, public_url)
    issuer = AnyHttpUrl(public_url)
    registration = ClientRegistrationOptions(enabled=True, valid_scopes=MCP_SCOPES, default_scopes=MCP_SCOPES)
    built = build_metadata(issuer, None, registration, RevocationOptions(enabled=True))
    # The issuer exactly as `iss` on the redirect back (RFC 9207): without the slash a URL type
    # would add to an empty path.
    metadata = OAuthMetadata.model_validate(
        built.model_dump(mode="json", exclude_none=True)
        | {
            "issuer": public_url,
            "token_endpoint_auth_methods_supported": ["none", "client_secret_post", "client_secret_basic"],
            "client_id_metadata_document_supported": True,
        }
    )
    authenticator = HashedSecrets(provider)  # type: ignore[arg-type]
    resource = ProtectedResourceMetadata.model_validate(
        {
            "resource": resource_url(public_url),
            "authorization_servers": [public_url],
            "scopes_supported": MCP_SCOPES,
            "resource_name": "Just Scan It webhooks",
        }
    )
    resource_handler = cors_middleware(ProtectedResourceMetadataHandler(resource).handle, ["GET", "OPTIONS"])
    return [
        Route(
            "/.well-known/oauth-authorization-server",
            cors_middleware(MetadataHandler(metadata).handle, ["GET", "OPTIONS"]),
            methods=["GET", "OPTIONS"],
        ),
        # RFC 9728 puts the resource's path after the well-known name; SPEC names the bare one.
        Route(RESOURCE_METADATA_PATH, resource_handler, methods=["GET", "OPTIONS"]),
        Route(f"{RESOURCE_METADATA_PATH}/mcp", resource_handler, methods=["GET", "OPTIONS"]),
        Route(
            "/authorize",
            AuthorizationHandler(provider).handle,  # type: ignore[arg-type]
            methods=["GET", "POST"],
        ),
        Route(
            "/token",
            cors_middleware(TokenHandler(provider, authenticator).handle, ["POST", "OPTIONS"]),  # type: ignore[arg-type]
            methods=["POST", "OPTIONS"],
        ),
        Route(
            "/register",
            cors_middleware(RegistrationHandler(provider, options=registration).handle, ["POST", "OPTIONS"]),  # type: ignore[arg-type]
            methods=["POST", "OPTIONS"],
        ),
        Route(
            "/revoke",
            cors_middleware(RevocationHandler(provider, authenticator).handle, ["POST", "OPTIONS"]),  # type: ignore[arg-type]
            methods=["POST", "OPTIONS"],
        ),
    ]

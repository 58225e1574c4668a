"""OAuth client ID metadata documents: fetching a client's JSON from its `https://` client_id.

The document's address is attacker-chosen, so it is fetched under the webhook URL rules (public
addresses only, https unless JUSTSCAN_ALLOW_PRIVATE_TARGETS), from the address that was checked
(the connection goes to that IP; TLS still verifies the host name), without redirects, within a
few seconds and at most `DOCUMENT_LIMIT` bytes.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from justscan_mcp.errors import InvalidInput
from justscan_mcp.targets import Resolver, checked_addresses

DOCUMENT_LIMIT = 64 * 1024
FETCH_TIMEOUT = 5.0


def looks_like_document_url(client_id: str) -> bool:
    return client_id.startswith(("https://", "http://"))


def fetch_client_document(url: str, *, allow_private: bool, resolve: Resolver) -> dict[str, Any]:
    """The client's metadata from `url`.

    Raises:
        InvalidInput: (client_id) an address the rules refuse, a host that does not resolve, an
            answer other than 200, a body over the limit or not a JSON object, a `client_id` in
            it other than `url`, or no redirect URIs.
    """
    # Imported here: httpx is ~50 ms of every process's start-up (stdio's reply to initialize
    # included), and only a sign-in by such a client fetches anything.
    import httpx

    try:
        host, port, addresses = checked_addresses(url, allow_private=allow_private, resolve=resolve)
    except InvalidInput as exc:
        raise InvalidInput("client_id", exc.reason) from None
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        raise InvalidInput("client_id", "a metadata document URL needs a path")
    ip = addresses[0]
    pinned = urlunsplit(
        (parts.scheme, f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}", parts.path, parts.query, "")
    )
    try:
        with (
            httpx.Client(timeout=FETCH_TIMEOUT, follow_redirects=False) as client,
            client.stream(
                "GET",
                pinned,
                headers={"Host": parts.netloc, "Accept": "application/json"},
                extensions={"sni_hostname": host},
            ) as response,
        ):
            if response.status_code != 200:
                raise InvalidInput("client_id", f"its metadata document answered HTTP {response.status_code}")
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > DOCUMENT_LIMIT:
                    raise InvalidInput("client_id", f"its metadata document is over {DOCUMENT_LIMIT} bytes")
    except httpx.HTTPError as exc:
        raise InvalidInput(
            "client_id", f"its metadata document could not be fetched ({type(exc).__name__})"
        ) from exc
    try:
        document = json.loads(body)
    except ValueError:
        raise InvalidInput("client_id", "its metadata document is not JSON") from None
    if not isinstance(document, dict):
        raise InvalidInput("client_id", "its metadata document is not a JSON object")
    if document.get("client_id") != url:
        raise InvalidInput("client_id", "its metadata document names another client_id")
    uris = document.get("redirect_uris")
    if not isinstance(uris, list) or not uris or not all(isinstance(u, str) for u in uris):
        raise InvalidInput("client_id", "its metadata document lists no redirect_uris")
    if document.get("token_endpoint_auth_method", "none") != "none":
        raise InvalidInput(
            "client_id", "a client known by its metadata document has no secret (auth method none)"
        )
    return document

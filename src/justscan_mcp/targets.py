"""Rules for where a webhook may point: URL shape and the address check against internal targets.

The classification is pure; name resolution is injected (`Resolver`) so the same rule runs at
creation (here, on `getaddrinfo`) and at delivery time (on the address actually connected to).
Like Svix and Hook0, an address is acceptable only when it is globally routable: RFC 1918,
loopback, link-local, CGNAT, multicast, reserved, unique-local and unspecified ranges are refused,
and IPv6 forms that embed an IPv4 address (mapped, 6to4, NAT64, Teredo) are judged by that address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import SplitResult, urlsplit

from justscan_mcp.errors import InvalidInput
from justscan_mcp.models import URL_MAX_LENGTH

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""(host, port) -> the IP addresses it resolves to; raises `OSError` when it does not resolve."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the operating system, as the delivery connection will."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_public_address(addr: IPAddress) -> bool:
    """True when `addr` is globally routable, judging embedded IPv4 addresses by themselves."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None:
            return is_public_address(inner)
    return addr.is_global and not addr.is_multicast


def parse_webhook_url(url: str, *, allow_private: bool) -> SplitResult:
    """Check the shape of a webhook URL (no network).

    Raises:
        InvalidInput: (field ``url``) for anything but an absolute http(s) URL with a host, at most
            2048 characters, https unless private targets are allowed.
    """
    if not isinstance(url, str) or not url:
        raise InvalidInput("url", "is required: an absolute https:// URL")
    if len(url) > URL_MAX_LENGTH:
        raise InvalidInput("url", f"is {len(url)} characters long; the limit is {URL_MAX_LENGTH}")
    if url != url.strip() or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise InvalidInput("url", "must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput("url", f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput("url", f"must be an absolute https:// URL, got {url[:80]!r}")
    if scheme == "http" and not allow_private:
        raise InvalidInput("url", "must use https:// (plain http is only allowed for local development)")
    if not parts.hostname:
        raise InvalidInput("url", "has no host name")
    if port == 0:
        raise InvalidInput("url", "port 0 is not a valid port")
    return parts


def check_addresses(host: str, addresses: Sequence[str]) -> None:
    """Refuse a host when any address it resolves to is not public.

    Raises:
        InvalidInput: (field ``url``) naming the host and the refused address.
    """
    for raw in addresses:
        addr = ipaddress.ip_address(raw.split("%", 1)[0])
        if not is_public_address(addr):
            raise InvalidInput(
                "url",
                f"host {host!r} resolves to {addr}, a private, loopback, link-local or reserved address; "
                "webhooks must point at a public address",
            )


def validate_webhook_url(url: str, *, allow_private: bool, resolve: Resolver) -> str:
    """Apply every URL rule of SPEC's Webhook section, resolving the host name.

    Raises:
        InvalidInput: (field ``url``) for a malformed URL, a host that does not resolve, or one
            that resolves to a non-public address while private targets are not allowed.
    """
    parts = parse_webhook_url(url, allow_private=allow_private)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        literal = None
    if literal is not None:
        addresses: Sequence[str] = [str(literal)]
    else:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError):
            addresses = []
        if not addresses:
            raise InvalidInput("url", f"host {host!r} does not resolve; check the spelling of the host name")
    if not allow_private:
        check_addresses(host, addresses)
    return url

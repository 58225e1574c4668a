"""Rules for where a webhook may point: URL shape and the address check against internal targets.

The classification is pure; name resolution is injected (`Resolver`) so the same rule runs at
creation (here, on `getaddrinfo`) and at delivery time (on the address actually connected to).
Like Svix and Hook0, an address is acceptable only when it is globally routable. The rule is an
explicit deny list (`DENIED_NETWORKS`, from the IANA special-purpose registries) and, on top of it,
Python's `is_global`: the standard library alone is not enough, because on 3.11 it calls
`::127.0.0.1` (IPv4-compatible), `64:ff9b:1::/48` (local-use NAT64) and `fec0::/10` (site-local)
global. IPv6 forms that embed an IPv4 address (mapped, 6to4, NAT64, Teredo) are judged by that
address; the deprecated IPv4-compatible form `::a.b.c.d` is refused outright.

Host names are taken as the HTTP client (aiohttp, through yarl) will connect to them, not as
`urllib` parses them: the two disagree on hosts such as `①②⑦.0.0.1`, which yarl normalises to
the literal 127.0.0.1 and then connects to without asking any resolver.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import SplitResult, urlsplit

from justscan_mcp.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
"""(host, port) -> the IP addresses it resolves to; raises `OSError` when it does not resolve."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")

DENIED_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        # IPv4 (RFC 6890 and successors)
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata services
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
        # IPv6
        "::/96",  # unspecified, loopback and the deprecated IPv4-compatible form
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments (Teredo is judged by its client address first)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # segment routing SIDs
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated, still routed inside some networks)
        "ff00::/8",  # multicast
    )
)


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
        if addr.scope_id:
            return False  # a zone index only means something on a local link
        inner = _embedded_ipv4(addr)
        if inner is not None:
            return is_public_address(inner)
    if any(addr.version == net.version and addr in net for net in DENIED_NETWORKS):
        return False
    return addr.is_global and not addr.is_multicast


def client_host(url: str) -> str:
    """The host exactly as aiohttp (yarl) will connect to it: IDNA- and NFKC-normalised, IPv6
    without brackets. Empty when yarl cannot parse the URL."""
    from yarl import URL

    try:
        return URL(url).host or ""
    except (ValueError, TypeError):
        return ""


def literal_address(host: str) -> IPAddress | None:
    """`host` as an IP address when it is one (a zone index is kept), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def parse_webhook_url(url: str, *, allow_private: bool) -> SplitResult:
    """Check the shape of a webhook URL (no network).

    Raises:
        InvalidInput: (field ``url``) for anything but an absolute http(s) URL with a host, https
            unless private targets are allowed. (Its length is a field rule: `inputs.WebhookUrl`.)
    """
    if not isinstance(url, str) or not url:
        raise InvalidInput("url", "is required: an absolute https:// URL")
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
        addr = ipaddress.ip_address(raw)
        if not is_public_address(addr):
            raise InvalidInput(
                "url",
                f"host {host!r} resolves to {addr}, a private, loopback, link-local or reserved address; "
                "webhooks must point at a public address",
            )


def checked_addresses(url: str, *, allow_private: bool, resolve: Resolver) -> tuple[str, int, list[str]]:
    """Apply every URL rule of SPEC's Webhook section, resolving the host name once: the host,
    port and addresses a client may connect to.

    Raises:
        InvalidInput: (field ``url``) for a malformed URL, a host that does not resolve, or one
            that resolves to a non-public address while private targets are not allowed.
    """
    parts = parse_webhook_url(url, allow_private=allow_private)
    host = client_host(url)
    if not host:
        raise InvalidInput("url", "has a host name the delivery client cannot use")
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    literal = literal_address(host)
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
    return host, port, list(addresses)


def validate_webhook_url(url: str, *, allow_private: bool, resolve: Resolver) -> str:
    """`checked_addresses`, for callers that keep only the URL.

    Raises:
        InvalidInput: (field ``url``) as `checked_addresses`.
    """
    checked_addresses(url, allow_private=allow_private, resolve=resolve)
    return url

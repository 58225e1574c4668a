"""The HTTP adapter that delivers: one signed POST per attempt, the outcome as data.

The POST goes through `http1.Client`, our small keep-alive HTTP/1.1 client: the client bounds the
delivery rate, and aiohttp's ClientSession cost about three times its CPU per POST (figures in
http1's docstring and docs/performance.md). Everything else uses the SDK's clients.

The private-address rule is enforced again here, on the addresses the connection will actually
use: host names go through a resolver that drops non-public addresses (so a DNS answer that changed
since the webhook was created cannot reach an internal service), and IP literals, which are not
resolved, are checked before connecting, as yarl (the client's URL parser) reads the host.
Redirects are not followed.

Name lookups run on a small thread pool of their own with a per-lookup time limit: on the event
loop's default executor a slow authoritative server would queue every other lookup, and other
thread work, behind it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from justscan_mcp import __version__
from justscan_mcp.http1 import AnswerError, Client, ConnectFailed, LookupFailed
from justscan_mcp.models import TIMEOUT_ERROR_PREFIX
from justscan_mcp.signing import guide_signature, standard_signatures
from justscan_mcp.targets import client_host, is_public_address, literal_address

BODY_LIMIT = 16 * 1024
DNS_TIMEOUT = 5.0  # seconds one lookup may take (never more than the delivery timeout)
DNS_THREADS = 8
USER_AGENT = f"justscan-webhooks/{__version__}"


class PrivateTargetRefused(OSError):
    """The target resolves only to addresses deliveries may not reach."""


@dataclass(frozen=True)
class SendResult:
    """What the receiver did with one POST: its status and body, or the error that stopped it."""

    status_code: int | None
    response_body: str | None
    error: str | None
    duration_ms: int
    retry_after: str | None = None  # the receiver's Retry-After header, as sent

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300 and self.error is None


class VettingResolver:
    """Resolve with the system, keep only public addresses (unless private targets are allowed).
    Lookups use their own bounded thread pool and time limit."""

    def __init__(self, *, allow_private: bool, timeout: float = DNS_TIMEOUT) -> None:
        self._allow_private = allow_private
        self._timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=DNS_THREADS, thread_name_prefix="justscan-dns")

    async def _lookup(self, host: str, port: int, family: socket.AddressFamily) -> list[tuple[int, str]]:
        lookup = partial(socket.getaddrinfo, host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._executor, lookup), self._timeout
            )
        except TimeoutError:
            # The thread finishes on its own; this delivery does not wait for it.
            raise OSError(f"looking up {host} took longer than {self._timeout:g}s") from None
        return [
            (int(fam), str(address[0]))
            for fam, _, _, _, address in infos
            if fam in (socket.AF_INET, socket.AF_INET6)
        ]

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, str]]:
        """(family, address) pairs to connect to, in the system's order.

        Raises:
            PrivateTargetRefused: every address is private while private targets are not allowed.
            OSError: the lookup failed (socket.gaierror) or took longer than its time limit.
        """
        results = await self._lookup(host, port, family)
        if self._allow_private:
            return results
        public = [r for r in results if is_public_address(ipaddress.ip_address(r[1]))]
        if not public:
            addrs = ", ".join(sorted({r[1] for r in results}))
            raise PrivateTargetRefused(f"refused: {host} resolves to {addrs}, not a public address")
        return public

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def delivery_headers(
    *, signing_secrets: list[str], delivery_id: int, event: str, body: bytes, timestamp: int, attempt: int = 1
) -> dict[str, str]:
    """SPEC's headers. `signing_secrets[0]` signs X-Webhook-Signature; all of them sign webhook-signature.
    X-Webhook-Attempt (1 to 4) is ours: receivers can log it, and tell a retry from a duplicate
    send of the same attempt (at least once: a process that dies mid-send repeats its attempt)."""
    msg_id = str(delivery_id)
    return {
        "X-Webhook-Attempt": str(attempt),
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Webhook-Signature": guide_signature(signing_secrets[0], body),
        "X-Webhook-Event": event,
        "X-Webhook-Delivery": msg_id,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_signatures(signing_secrets, msg_id, timestamp, body),
    }


class Sender:
    """Posts deliveries over one pooled `http1.Client`. Create and close it on the event loop."""

    def __init__(self, *, timeout: float, allow_private: bool, max_connections: int = 100) -> None:
        self.timeout = timeout
        self.allow_private = allow_private
        self._max_connections = max_connections
        self._client: Client | None = None
        self._resolver: VettingResolver | None = None

    async def start(self) -> None:
        self._resolver = VettingResolver(
            allow_private=self.allow_private, timeout=min(DNS_TIMEOUT, self.timeout)
        )
        self._client = Client(resolve=self._resolver.resolve, max_connections=self._max_connections)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    def _literal_refusal(self, url: str) -> str | None:
        """A refusal for an IP literal that may not be reached, judged on the host as the client
        will connect to it (literals skip the resolver, and so its check)."""
        if self.allow_private:
            return None
        addr = literal_address(client_host(url))
        if addr is None or is_public_address(addr):
            return None
        return f"refused: {addr} is not a public address"

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> SendResult:
        """One attempt. Never raises for a receiver's behaviour: failures come back as data."""
        assert self._client is not None, "Sender.start() first"
        started = time.perf_counter()

        def done(
            status: int | None = None,
            text: str | None = None,
            error: str | None = None,
            retry_after: str | None = None,
        ) -> SendResult:
            return SendResult(status, text, error, int((time.perf_counter() - started) * 1000), retry_after)

        if refusal := self._literal_refusal(url):
            return done(error=refusal)
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self._client.post(url, body, headers, limit=BODY_LIMIT)
        except TimeoutError:
            return done(error=f"{TIMEOUT_ERROR_PREFIX} after {self.timeout:g}s")
        except LookupFailed as exc:
            if isinstance(exc.os_error, PrivateTargetRefused):
                return done(error=str(exc.os_error))
            if not isinstance(exc.os_error, socket.gaierror):
                return done(error=f"host lookup failed: {exc.os_error}"[:500])
            return done(error=f"host does not resolve: {exc.host}")
        except ConnectFailed as exc:
            return done(error=f"connection failed: {exc.reason}"[:500])
        except AnswerError as exc:
            return done(error=str(exc)[:500])
        except OSError as exc:
            return done(error=f"{type(exc).__name__}: {exc}"[:500])
        text = answer.body.decode("utf-8", errors="replace")
        if 300 <= answer.status < 400:
            location = answer.location or ""
            return done(
                answer.status,
                text,
                f"redirect to {location[:200]!r} not followed".replace("''", "nowhere"),
            )
        if not 200 <= answer.status < 300:
            return done(answer.status, text, f"receiver answered HTTP {answer.status}", answer.retry_after)
        return done(answer.status, text)

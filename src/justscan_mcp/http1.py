"""The delivery hot path's HTTP/1.1 client: POSTs over keep-alive connections pooled per origin.

Each POST gives back its status, two headers (Retry-After, Location) and at most a limit of the
body.

Why our own and not aiohttp's ClientSession (which the sender used until issue 17): the client is
what bounds the delivery rate. Measured on this machine (2026-11-30, 64 in flight, the same signed
bodies, counted at the receiver, uvloop): aiohttp's ClientSession spent 275-300 µs of CPU per POST
and reached 3.4-3.7k posts/s; this client spends 90-107 µs and reached 6.4-7.0k/s, where the
receiver became the limit. The difference is aiohttp's general-purpose request path (request and
response objects, header multidicts, timers, tracing hooks, payload machinery), not parsing: both
parse answers with llhttp (here through httptools, which uvicorn already uses).

What it does:
- HTTP/1.1 keep-alive. A connection returns to the pool only after a whole answer that allows
  keep-alive (llhttp's `should_keep_alive`: not HTTP/1.0 without keep-alive, not
  `Connection: close`); idle connections are closed after `keepalive` seconds, and a connection
  the peer closed while idle is noticed (`connection_lost`) and never reused.
- Content-Length, chunked and read-to-close answers; interim 1xx answers are skipped.
- A body over the limit: the first `limit` bytes are kept and the connection is closed, never
  drained.
- Addresses come from the caller's `resolve` (where the private-address rule lives), tried with
  Happy Eyeballs (the next one 0.25 s after the last unless it failed sooner); IP literals
  are connected to as they are. TLS verifies the certificate against the URL's host.
- Userinfo in the URL is sent as Basic authorization, as aiohttp did.

What it leaves out on purpose: redirects (a webhook never follows one), proxies (the aiohttp
session did not read proxy settings either), decompression (nothing asks for it), cookies,
HTTP/2, and retries: a failed attempt is the dispatcher's to retry, on its schedule.

Errors:
    LookupFailed(OSError)    the host name could not be resolved to a usable address
    ConnectFailed(OSError)   every address refused, timed out or failed the TLS handshake
    AnswerError(OSError)     the peer broke HTTP or closed the connection before its answer
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import time
from asyncio.staggered import staggered_race
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import httptools
from yarl import URL

from justscan_mcp.targets import literal_address

KEEPALIVE = 15.0  # seconds an idle connection is kept (aiohttp's default)
HAPPY_EYEBALLS_DELAY = 0.25  # seconds before the next address is tried beside the last (RFC 8305)
TARGET_CACHE = 1024  # parsed URLs kept; a dispatcher sends to a few webhooks' URLs over and over

# resolve(host, port) -> [(family, address)], in the order to try them
Resolve = Callable[[str, int], Awaitable[list[tuple[int, str]]]]


class LookupFailed(OSError):
    """The host name did not give an address this client may use; `os_error` says why."""

    def __init__(self, host: str, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.host = host
        self.os_error = os_error


class ConnectFailed(OSError):
    """No address of the host took the connection; `os_error` is the last address's error."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error

    @property
    def reason(self) -> str:
        """ "Connection refused", a TLS verification failure, ...: asyncio words a refused
        connection as "Connect call failed ('1.2.3.4', 443)", which says nothing."""
        exc = self.os_error
        if isinstance(exc, ssl.SSLError) or not exc.errno:
            return str(exc.strerror or exc)
        return os.strerror(exc.errno)


class AnswerError(OSError):
    """The receiver broke HTTP, or closed the connection before its answer was complete."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes  # at most the limit asked for
    retry_after: str | None
    location: str | None


@dataclass(frozen=True, slots=True)
class _Target:
    key: tuple[str, str, int]  # the pool key: scheme, host, port
    tls: bool
    host: str  # as connected to and verified (IDNA; an IPv6 literal without brackets)
    port: int
    head: bytes  # "POST path HTTP/1.1", Host and, from userinfo, Authorization


def _parse(url: str) -> _Target:
    u = URL(url)
    if u.scheme not in ("http", "https") or not u.raw_host or u.port is None:
        raise AnswerError(f"cannot send to {url[:80]!r}: not an absolute http(s) URL")
    lines = [f"POST {u.raw_path_qs or '/'} HTTP/1.1", f"Host: {u.host_port_subcomponent}"]
    if any(c in line for line in lines for c in "\r\n"):
        raise AnswerError("refused: a line break in the URL")  # yarl encodes them; never a header injection
    if u.user is not None:
        token = base64.b64encode(f"{u.user}:{u.password or ''}".encode("latin-1")).decode("ascii")
        lines.append(f"Authorization: Basic {token}")
    head = "\r\n".join(lines) + "\r\n"
    return _Target(
        (u.scheme, u.raw_host, u.port), u.scheme == "https", u.raw_host, u.port, head.encode("latin-1")
    )


def _interleaved(addresses: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The first family's first address, then the families alternating (RFC 8305, 4)."""
    groups: dict[int, list[tuple[int, str]]] = {}
    for pair in addresses:
        groups.setdefault(pair[0], []).append(pair)
    lists = list(groups.values())
    return [g[i] for i in range(max(map(len, lists), default=0)) for g in lists if i < len(g)]


class _Connection(asyncio.Protocol):
    """One socket and its answer parser. At most one request in flight (no pipelining)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[Answer] | None = None
        self._status = 0
        self._body: list[bytes] = []
        self._size = 0
        self._retry_after: str | None = None
        self._location: str | None = None
        self._reusable = False

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes nobody asked for (an answer after ours ended, or to nothing): the peer is out
            # of step, so the connection is not reused.
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(AnswerError("the receiver switched protocols instead of answering"))
        except httptools.HttpParserError as exc:
            self._fail(AnswerError(f"malformed answer: {exc}"[:300]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._status >= 200:
            # Headers arrived: a read-to-close body ends here (llhttp is never told of the end
            # of the stream), and a shorter body than announced still carries the receiver's
            # verdict, its status.
            self._finish(reusable=False)
        elif exc is None:
            waiter.set_exception(AnswerError("the receiver closed the connection without answering"))
        else:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            waiter.set_exception(AnswerError(f"connection lost: {reason}"))

    # --- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None or self._waiter.done():
            # A second answer after ours, in the same packet: the peer is out of step. Reused,
            # the connection would hand the rest of it to the next request as its answer.
            self._reusable = False
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"retry-after":
            self._retry_after = value.decode("latin-1")
        elif lowered == b"location":
            self._location = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self._status < 200 or self._waiter is None or self._waiter.done():
            return
        room = self.limit - self._size
        self._body.append(body[:room])
        self._size += min(room, len(body))
        if len(body) > room:
            self._finish(reusable=False)  # over the limit: keep what fits, do not drain the rest

    def on_message_complete(self) -> None:
        if self._status < 200:
            self._reset()  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            return
        if self._waiter is not None and not self._waiter.done():
            self._finish(reusable=self.parser.should_keep_alive())

    # --- used by the client -------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def send(self, head: bytes, body: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None
        self._reset()
        self._reusable = False
        self._waiter = asyncio.get_running_loop().create_future()
        # One write of a small request; a large body is not copied into a joined buffer.
        if len(body) < 4096:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))
        return self._waiter

    @property
    def reusable(self) -> bool:
        return self._reusable and self.usable

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _reset(self) -> None:
        self._status = 0
        self._body = []
        self._size = 0
        self._retry_after = None
        self._location = None

    def _finish(self, *, reusable: bool) -> None:
        assert self._waiter is not None
        self._reusable = reusable
        self._waiter.set_result(Answer(self._status, b"".join(self._body), self._retry_after, self._location))
        if not reusable:
            self.close()

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()


class Client:
    """Posts over pooled keep-alive connections. Create, use and close it on one event loop.

    `max_connections` bounds the connections in use at once (idle ones do not count, as in
    aiohttp); a post beyond it waits for a free one.
    """

    def __init__(
        self,
        *,
        resolve: Resolve,
        max_connections: int = 100,
        keepalive: float = KEEPALIVE,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._resolve = resolve
        self._slots = asyncio.Semaphore(max_connections)
        self._keepalive = keepalive
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._last_sweep = time.monotonic()

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()  # built on first https use: it reads the CA store
        return self._ssl

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= TARGET_CACHE:
                self._targets.clear()
            target = self._targets[url] = _parse(url)
        return target

    async def post(self, url: str, body: bytes, headers: dict[str, str], *, limit: int) -> Answer:
        """POST `body` to `url` with `headers` (Host, Content-Length and, from userinfo,
        Authorization are added) and return the answer, its body cut at `limit` bytes.

        Raises:
            LookupFailed: the host name gave no usable address.
            ConnectFailed: no address took the connection (refused, unreachable, TLS).
            AnswerError: the receiver broke HTTP or closed before answering.
        """
        target = self._target(url)
        lines = [f"{k}: {v}\r\n" for k, v in headers.items()]
        head = b"".join(
            (target.head, f"Content-Length: {len(body)}\r\n{''.join(lines)}\r\n".encode("latin-1"))
        )
        async with self._slots:
            conn = self._take_idle(target.key) or await self._connect(target, limit)
            conn.limit = limit
            done = False
            try:
                answer = await conn.send(head, body)
                done = True
            finally:
                if done and conn.reusable:
                    self._put_back(target.key, conn)
                else:
                    conn.close()  # cancelled (a timeout), failed, or not for reuse
        return answer

    async def _connect(self, target: _Target, limit: int) -> _Connection:
        if literal_address(target.host) is not None:
            family = int(socket.AF_INET6 if ":" in target.host else socket.AF_INET)
            addresses: list[tuple[int, str]] = [(family, target.host)]
        else:
            try:
                addresses = await self._resolve(target.host, target.port)
            except OSError as exc:
                raise LookupFailed(target.host, exc) from exc
        if not addresses:
            raise ConnectFailed(OSError(f"{target.host} has no address"))
        loop = asyncio.get_running_loop()

        def attempt(family: int, address: str) -> Callable[[], Awaitable[_Connection]]:
            async def connect() -> _Connection:
                _transport, conn = await loop.create_connection(
                    lambda: _Connection(limit),
                    address,
                    target.port,
                    family=family,
                    ssl=self._tls() if target.tls else None,
                    server_hostname=target.host if target.tls else None,
                )
                return conn

            return connect

        # Happy Eyeballs (RFC 8305), as asyncio's and aiohttp's own connects do: the next address
        # starts HAPPY_EYEBALLS_DELAY after the last unless that one failed sooner, the families
        # interleaved, so an address that swallows SYNs (a broken IPv6 route) costs a quarter of
        # a second, not the whole attempt.
        winner, _index, errors = await staggered_race(
            [attempt(f, a) for f, a in _interleaved(addresses)], HAPPY_EYEBALLS_DELAY
        )
        if winner is not None:
            return cast(_Connection, winner)
        for error in errors:
            if error is not None and not isinstance(error, OSError):
                raise error
        last = next((e for e in reversed(errors) if isinstance(e, OSError)), None)
        raise ConnectFailed(last or OSError(f"{target.host}: no address answered")) from last

    def _fresh(self, conn: _Connection, now: float) -> bool:
        """Open and idle for less than keep-alive: worth reusing."""
        return conn.usable and now - conn.idle_since < self._keepalive

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed
            if self._fresh(conn, now):
                return conn
            conn.close()
        return None

    def _put_back(self, key: tuple[str, str, int], conn: _Connection) -> None:
        now = time.monotonic()
        conn.idle_since = now
        self._idle.setdefault(key, []).append(conn)
        if now - self._last_sweep > self._keepalive:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close connections idle for longer than keep-alive, of every origin (an origin that gets
        no more deliveries would otherwise hold its sockets until the peer closes them)."""
        self._last_sweep = now
        for key, idle in list(self._idle.items()):
            kept = []
            for conn in idle:
                if self._fresh(conn, now):
                    kept.append(conn)
                else:
                    conn.close()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]

    def idle_connections(self) -> int:
        """How many connections wait in the pool (for tests and the operator's curiosity)."""
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

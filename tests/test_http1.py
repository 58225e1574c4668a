"""The delivery client (http1.py) against raw sockets on 127.0.0.1 that answer scripted bytes:
every way a receiver can end an answer, and the guarantee that pooling could break (an answer is
never read as another request's, a connection is reused only after a whole keep-alive answer)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from justscan_mcp.sender import BODY_LIMIT, Sender

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    """Accepts connections and hands each request to `handler(reader, writer, n)` (n counts
    requests across connections). Records every request's head and body."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                if await self.handler(reader, writer, len(self.requests)) is False:  # type: ignore[func-returns-value]
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RawServer]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def answer(status: int = 200, body: bytes = b"ok", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


@asynccontextmanager
async def sender(timeout: float = 2.0) -> AsyncIterator[Sender]:
    s = Sender(timeout=timeout, allow_private=True)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def test_keep_alive_reuses_one_connection_and_sends_what_it_was_given():
    async def ok(reader, writer, n):
        writer.write(answer(200, f"ok {n}".encode()))

    async with RawServer(ok).running() as srv, sender() as s:
        for i in range(3):
            out = await s.post(srv.url(), b'{"i": %d}' % i, {"X-Webhook-Event": "scan"})
            assert (out.status_code, out.response_body, out.error) == (200, f"ok {i + 1}", None)
        assert srv.connections == 1
        head, body = srv.requests[2]
        assert head.startswith(b"POST /hook HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{srv.port}\r\n".encode() in head
        assert b"X-Webhook-Event: scan\r\n" in head and b"Content-Length: 8\r\n" in head
        assert body == b'{"i": 2}'


async def test_connection_close_and_http10_answers_are_not_reused():
    async def closing(reader, writer, n):
        if n == 1:
            writer.write(answer(200, b"a", "Connection: close\r\n"))
        else:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb")
        await writer.drain()
        return False

    async with RawServer(closing).running() as srv, sender() as s:
        first = await s.post(srv.url(), b"{}", {})
        second = await s.post(srv.url(), b"{}", {})
        assert (first.status_code, first.response_body, second.response_body) == (200, "a", "b")
        assert srv.connections == 2


async def test_chunked_read_to_close_and_interim_answers():
    async def varied(reader, writer, n):
        if n == 1:
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )
        elif n == 2:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(201, b"after 100"))
        else:
            writer.write(b"HTTP/1.0 202 Accepted\r\n\r\nto the end")
            await writer.drain()
            return False

    async with RawServer(varied).running() as srv, sender() as s:
        chunked = await s.post(srv.url(), b"{}", {})
        interim = await s.post(srv.url(), b"{}", {})
        to_close = await s.post(srv.url(), b"{}", {})
    assert (chunked.status_code, chunked.response_body) == (200, "abcde")
    assert (interim.status_code, interim.response_body) == (201, "after 100")
    assert (to_close.status_code, to_close.response_body, to_close.error) == (202, "to the end", None)
    assert srv.connections == 1  # chunked and the 100-then-201 both left the connection reusable


async def test_a_body_over_the_limit_is_cut_and_its_connection_closed_not_drained():
    async def endless(reader, writer, n):
        if n > 1:
            writer.write(answer(200, b"fresh"))
            return
        writer.write(b"HTTP/1.1 500 X\r\nContent-Length: 100000000\r\n\r\n")
        try:
            for _ in range(10_000):  # 640 MB if the client drained it: it must hang up first
                writer.write(b"x" * 65536)
                await writer.drain()
        except ConnectionError:
            pass
        return False

    async with RawServer(endless).running() as srv, sender() as s:
        big = await s.post(srv.url(), b"{}", {})
        assert big.status_code == 500 and big.response_body == "x" * BODY_LIMIT
        after = await s.post(srv.url(), b"{}", {})
        assert after.response_body == "fresh" and srv.connections == 2


async def test_an_answer_that_comes_after_the_timeout_is_never_read_as_the_next_ones():
    """The late answer of a timed-out attempt sits on its connection: reusing that connection
    would hand it to the next delivery. The timed-out connection is closed instead."""

    async def late_then_fast(reader, writer, n):
        if n == 1:
            await asyncio.sleep(0.6)
            writer.write(answer(500, b"late answer for the first"))
        else:
            writer.write(answer(200, b"answer for the second"))

    async with RawServer(late_then_fast).running() as srv, sender(timeout=0.3) as s:
        first = await s.post(srv.url(), b"{}", {})
        assert first.status_code is None and first.error.startswith("timed out")
        second = await s.post(srv.url(), b"{}", {})
        assert (second.status_code, second.response_body) == (200, "answer for the second")
        assert srv.connections == 2


async def test_a_connection_the_receiver_closed_while_idle_is_not_reused():
    async def ok_then_close(reader, writer, n):
        writer.write(answer(200, f"ok {n}".encode()))
        await writer.drain()
        return False  # the server hangs up after each answer without saying so

    async with RawServer(ok_then_close).running() as srv, sender() as s:
        for _ in range(3):
            await asyncio.sleep(0.05)  # the close reaches the idle connection first
            out = await s.post(srv.url(), b"{}", {})
            assert (out.status_code, out.error) == (200, None), out
        assert srv.connections == 3


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (b"", "the receiver closed the connection without answering"),
        (b"SMTP ready\r\n\r\n", "malformed answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "malformed answer"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\n",
            "switched protocols",
        ),
    ],
)
async def test_broken_answers_are_failed_attempts_naming_what_went_wrong(sent: bytes, error: str):
    async def broken(reader, writer, n):
        writer.write(sent)
        await writer.drain()
        return False

    async with RawServer(broken).running() as srv, sender() as s:
        out = await s.post(srv.url(), b"{}", {})
        assert out.status_code is None and out.error is not None and error in out.error, out


async def test_headers_are_read_when_split_across_packets_and_userinfo_is_basic_auth():
    async def trickle(reader, writer, n):
        for piece in (
            b"HTTP/1.1 429 Too",
            b" Many\r\nRetry-",
            b"After: 7\r\nContent-Len",
            b"gth: 2\r\n\r\nn",
            b"o",
        ):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)

    async with RawServer(trickle).running() as srv, sender() as s:
        out = await s.post(f"http://user:p%40ss@127.0.0.1:{srv.port}/h?x=1", b"{}", {})
    assert (out.status_code, out.response_body, out.retry_after) == (429, "no", "7")
    head = srv.requests[0][0]
    assert head.startswith(b"POST /h?x=1 HTTP/1.1\r\n")
    assert b"Authorization: Basic " + base64.b64encode(b"user:p@ss") + b"\r\n" in head


async def test_a_refused_connection_names_the_reason():
    async with RawServer(lambda *a: asyncio.sleep(0)).running() as srv:
        port = srv.port
    async with sender() as s:
        out = await s.post(f"http://127.0.0.1:{port}/h", b"{}", {})
    assert out.status_code is None and out.error == "connection failed: Connection refused"


async def test_concurrent_posts_each_get_their_own_answer():
    async def echo(reader, writer, n):
        _head, body = srv.requests[n - 1]
        await asyncio.sleep(0.001 * (n % 7))
        writer.write(answer(200, body))

    srv = RawServer(echo)
    async with srv.running(), sender() as s:
        outs = await asyncio.gather(*(s.post(srv.url(), b"%d" % i, {}) for i in range(200)))
    assert [o.response_body for o in outs] == [str(i) for i in range(200)]
    assert srv.connections <= 100


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[str, str]:
    import subprocess

    from tests.conftest import program

    openssl = program("openssl", "apt-get install openssl")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_is_verified_against_the_urls_host(tls_files: tuple[str, str]):
    """A certificate no CA vouches for is a failed attempt that says so; one the client trusts
    carries the request over TLS on a kept-alive connection."""
    import ssl

    from justscan_mcp.http1 import Client

    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def ok(reader, writer, n):
        writer.write(answer(200, b"over tls"))

    srv = RawServer(ok)
    server = await asyncio.start_server(srv._serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        async with sender() as s:
            refused = await s.post(f"https://127.0.0.1:{port}/h", b"{}", {})
        assert refused.status_code is None and "CERTIFICATE_VERIFY_FAILED" in (refused.error or ""), refused

        async def resolve(host: str, port: int) -> list[tuple[int, str]]:
            raise AssertionError("a literal is not looked up")

        client = Client(resolve=resolve, ssl_context=ssl.create_default_context(cafile=cert))
        try:
            for _ in range(2):
                got = await client.post(f"https://127.0.0.1:{port}/h", b"{}", {}, limit=100)
                assert (got.status, got.body) == (200, b"over tls")
        finally:
            await client.close()
    assert srv.connections == 1  # both posts on one connection (the refused handshake never got this far)


async def test_an_address_that_swallows_the_connect_costs_a_moment_not_the_attempt():
    """Happy Eyeballs: a name whose first address never completes a connect (here a listener
    with a full queue, which drops the SYN as a broken route does) still gets its delivery
    through the next address, well inside the attempt's time."""
    import socket

    from justscan_mcp.http1 import Client

    async def ok(reader, writer, n):
        writer.write(answer(200, b"second address"))

    async with RawServer(ok).running() as srv:
        stuck = socket.socket()
        stuck.bind(("127.0.0.2", srv.port))
        stuck.listen(0)
        filler = socket.create_connection(("127.0.0.2", srv.port))  # the queue's one place
        try:

            async def resolve(host: str, port: int) -> list[tuple[int, str]]:
                return [(socket.AF_INET, "127.0.0.2"), (socket.AF_INET, "127.0.0.1")]

            client = Client(resolve=resolve)
            try:
                with anyio.fail_after(2):
                    got = await client.post(f"http://dual.test:{srv.port}/h", b"{}", {}, limit=100)
            finally:
                await client.close()
        finally:
            filler.close()
            stuck.close()
    assert (got.status, got.body) == (200, b"second address")


async def test_bytes_after_a_whole_answer_never_become_the_next_requests_answer():
    """A receiver out of step sends a second answer after ours on a kept-alive connection, its
    head split across packets: the rest arrives once the next request is sent. Reused, that
    connection would hand the stray answer to the next delivery as its own."""

    async def out_of_step(reader, writer, n):
        if n == 1:
            writer.write(answer(200, b"a") + b"HTTP/1.1 200 OK\r\nContent-Len")
        elif srv.connections == 1:
            writer.write(b"gth: 5\r\n\r\nstray")  # the second request came on the same connection
        else:
            writer.write(answer(200, b"b"))

    srv = RawServer(out_of_step)
    async with srv.running(), sender() as s:
        first = await s.post(srv.url(), b"{}", {})
        await asyncio.sleep(0.05)
        second = await s.post(srv.url(), b"{}", {})
    assert (first.response_body, second.response_body) == ("a", "b")

"""A real webhook receiver on 127.0.0.1 for delivery tests.

It checks X-Webhook-Signature exactly as the guide's Python snippet does and answers 401 when it
does not verify. Behaviour is scripted per path: a queue of responses (status, delay, body,
headers); when the queue is empty the path answers 200.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    status: int = 200
    delay: float = 0.0
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    at: float  # time.monotonic() on arrival


def guide_verify(secret: str, raw_body: bytes, signature: str) -> None:
    """The guide's Python snippet, as written."""

    expected = hmac.new(
        secret.encode("utf-8"),
        raw_body,
        hashlib.sha256,
    ).hexdigest()

    if not hmac.compare_digest(expected, signature):
        raise ValueError("Invalid signature")


class Receiver:
    def __init__(self, port: int = 0) -> None:
        self.received: list[Received] = []
        self.secrets: dict[str, str] = {}
        self.script: dict[str, deque[Reply]] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                path = self.path
                secret = receiver.secrets.get(path)
                verified = False
                if secret is not None:
                    try:
                        guide_verify(secret, raw, self.headers.get("X-Webhook-Signature", ""))
                        verified = True
                    except ValueError:
                        verified = False
                with receiver._lock:
                    receiver.received.append(
                        Received(
                            path,
                            {k.lower(): v for k, v in self.headers.items()},
                            raw,
                            verified,
                            time.monotonic(),
                        )
                    )
                    queue = receiver.script.get(path)
                    reply = queue.popleft() if queue else Reply()
                if secret is not None and not verified:
                    reply = Reply(401, body=b"Invalid signature")
                if reply.delay:
                    time.sleep(reply.delay)
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            # socketserver's default backlog of 5 drops connections under a burst of concurrent
            # deliveries (seen as 5 s timeouts); real servers listen with hundreds.
            request_queue_size = 1024

        self.server = Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def expect(self, path: str, *replies: Reply) -> None:
        with self._lock:
            self.script[path] = deque(replies)

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class BlackHole:
    """A receiver that accepts connections and never answers: the worst receiver there is. It
    reads what it is sent and holds every connection open until it is closed."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._conns: list[object] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> BlackHole:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()
        for conn in self._conns:
            conn.close()  # type: ignore[attr-defined]
        self.sock.close()

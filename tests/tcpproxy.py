"""A tiny TCP forwarder for fault injection: put it between a process and PostgreSQL, then start,
stop or cut it to simulate the database appearing, vanishing or dropping connections. With
`rewrite`, every chunk from client to target passes through it: a man in the middle that
tampers with requests (the receiver tests change one byte of a signed body in transit)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class TcpProxy:
    def __init__(
        self,
        listen_port: int,
        target: tuple[str, int],
        rewrite: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.listen_port = listen_port
        self.target = target
        self.rewrite = rewrite
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.listen_port))
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b, change in ((client, upstream, self.rewrite), (upstream, client, None)):
                threading.Thread(target=self._pipe, args=(a, b, change), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, change: Callable[[bytes], bytes] | None) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(change(data) if change else data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

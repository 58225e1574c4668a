"""stdin and stdout as event-loop pipes, for the MCP stdio transport.

The SDK's `stdio_server()` reads and writes the standard streams through anyio's file wrapper:
one worker-thread hop for each line read, one for each write and one for each flush, three on
every call. When fd 0 and fd 1 are both pipes (how an MCP client launches a server),
`pipe_stdio()` hands `stdio_server()` the same two streams read and written by the event loop
itself; docs/performance.md has the measurement.

It keeps the SDK's claim on the descriptors: while serving, fd 0 reads the null device and fd 1
writes to stderr, so a stray `print()` or a child process cannot tear a frame on the wire, and
both are put back afterwards. Anything other than a pipe is left to the SDK: a terminal (whose
blocking mode the user's shell shares), a file, or a socket (a socket used for both directions
would look closed to asyncio's write-pipe transport whenever input arrives). Windows, whose
event loop has no such pipes, is left to the SDK too.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

_CHUNK = 64 * 1024


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


class PipeLines:
    """The wire's lines, the way `stdio_server()` reads them: `async for line in stdin`."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._pending = bytearray()

    def __aiter__(self) -> PipeLines:
        return self

    async def __anext__(self) -> str:
        # No limit on a line's length, as with the SDK's reader: the client on stdio is the user's
        # own program, and one large call must not end the session. Decoded per whole line, so a
        # character split between two reads is never mangled; bad bytes become U+FFFD, as there.
        while True:
            end = self._pending.find(b"\n")
            if end >= 0:
                line = bytes(self._pending[: end + 1])
                del self._pending[: end + 1]
                return line.decode("utf-8", errors="replace")
            chunk = await self._reader.read(_CHUNK)
            if not chunk:
                if not self._pending:
                    raise StopAsyncIteration
                line = bytes(self._pending)
                self._pending.clear()
                return line.decode("utf-8", errors="replace")
            self._pending += chunk


class PipeWriter:
    """The wire's output, the way `stdio_server()` writes it: `write()`, then `flush()`."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, text: str) -> int:
        self._writer.write(text.encode("utf-8"))
        return len(text)

    async def flush(self) -> None:
        # A client that stops reading holds the next answer here, not in an ever-growing buffer.
        await self._writer.drain()


@asynccontextmanager
async def pipe_stdio() -> AsyncIterator[tuple[PipeLines, PipeWriter] | None]:
    """The wire's lines and a writer for it, served by the event loop; None (and the standard
    streams untouched) unless fd 0 and fd 1 are both pipes, on a POSIX system.

    Raises:
        OSError: the descriptors could not be duplicated or diverted (nothing is left diverted).
    """
    if sys.platform == "win32" or not (_is_pipe(0) and _is_pipe(1)):
        yield None
        return
    import fcntl  # POSIX only: imported here so that the module still imports on Windows

    loop = asyncio.get_running_loop()
    # The wire moves above the standard range (close-on-exec: children never get it): one copy
    # for the transports, which close theirs when the client does, one to put back afterwards.
    saved_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    saved_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    pipe_in = os.fdopen(fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3), "rb", buffering=0)
    pipe_out = os.fdopen(fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3), "wb", buffering=0)
    reading: asyncio.ReadTransport | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(null, 0)
        finally:
            os.close(null)
        os.dup2(2, 1)
        reader = asyncio.StreamReader(limit=_CHUNK)
        reading, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe_in)
        writing, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, pipe_out)
        writer = asyncio.StreamWriter(writing, protocol, None, loop)
        yield PipeLines(reader), PipeWriter(writer)
        with suppress(OSError, ConnectionError):
            await writer.drain()  # the last answer reaches the client before the wire goes back
    finally:
        if writer is not None:
            writer.close()
        else:
            pipe_out.close()
        if reading is not None:
            reading.close()
        else:
            pipe_in.close()
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        os.close(saved_in)
        os.close(saved_out)
        # asyncio made the pipes non-blocking; whoever reads them next expects them as they were.
        os.set_blocking(0, True)
        os.set_blocking(1, True)

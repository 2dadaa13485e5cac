"""The viewer's sockets: one event-loop thread accepts connections and reads each request's head under a
deadline; a bounded pool of worker threads answers complete requests; the loop writes the answers back.

Why not `http.server.ThreadingHTTPServer`: it listens with a backlog of 5 (a page asking for hundreds of
tiles at once gets connections reset), starts a thread per connection without a cap, and a client that
sends half a request holds its thread forever. Here:

- the listen backlog is `BACKLOG` (the kernel may cap it lower: `net.core.somaxconn`);
- a connection's request head must arrive within `head_timeout` seconds, or it is closed; while
  `max_connections` are open, a new connection closes the one that has waited longest for its head
  (nothing to answer yet), or is answered 503 when every open one is being served;
- requests are answered by `workers` threads; waiting costs a coroutine, not a thread, so the loop stays
  responsive however many clients wait;
- one request per connection (HTTP/1.0), answers written in full or dropped after `write_timeout`;
- a client that goes away is normal: nothing is logged for it.

`handle(head, peer) -> bytes` turns a head (request line and headers, CRLF-separated, ending in an empty
line) into the whole response; it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import socket
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

BACKLOG = 1024
HEAD_LIMIT = 64 << 10  # bytes of a request head (request line and headers)
HEAD_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
MAX_CONNECTIONS = 2048
FD_RESERVE = 64  # file descriptors kept free of connections (stores, logs, imports)
BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 23\r\nRetry-After: 1\r\n\r\n503 too many requests\r\n"
)
DISCARD = 64 << 10  # body bytes read even when bodies are not accepted (the 405 then reaches the client)
# a refused body up to this size is read and dropped in pieces before the 405: a client still sending it
# would otherwise meet a closed connection (a broken pipe) instead of the answer
DRAIN = 16 << 20
CONTENT_LENGTH = re.compile(rb"\ncontent-length:[ \t]*(\d{1,12})[ \t]*\r?\n", re.IGNORECASE)
BODY_TOO_LARGE = (
    b"HTTP/1.0 413 Content Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 27\r\n\r\n413 request body too large\r\n"
)
TOO_LARGE = (
    b"HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 33\r\n\r\n431 request head is too large\r\n\r\n"
)

Handler = Callable[[bytes, tuple[str, int]], bytes]


@dataclass(frozen=True)
class Limits:
    """How much the server takes on: worker threads (None: `default_workers()`), open connections (None:
    `connection_cap()`), seconds for a request head to arrive and for an answer to be taken."""

    workers: int | None = None
    max_connections: int | None = None
    head_timeout: float = HEAD_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT
    max_body: int = 0

    def __post_init__(self) -> None:
        for name in ("workers", "max_connections"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not (self.head_timeout > 0 and self.write_timeout > 0):
            raise ValueError("timeouts must be > 0")


def default_workers() -> int:
    """Worker threads: tile work is decoding and encoding, which release the GIL in part."""
    return max(4, min(32, 4 * (os.cpu_count() or 1)))


def connection_cap(wanted: int = MAX_CONNECTIONS) -> int:
    """`wanted`, lowered to fit this process's open-file limit (raised to its hard limit first: the
    soft limit is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else wanted + 4 * FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft - FD_RESERVE))


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) (port 0: any free one), IPv4 or IPv6 by the host; not yet
    listening. Raises OSError (address in use, unknown host)."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class ViewerServer:
    """Serve `handle` on the bound socket `sock` within `limits` (see the module docstring); `log` gets
    one line per problem of the server's own (default: stderr). `serve_forever()` blocks until
    `shutdown()` (from another thread); `server_close()` releases the socket and the workers."""

    def __init__(
        self,
        sock: socket.socket,
        handle: Handler,
        *,
        limits: Limits | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        limits = limits or Limits()
        self.socket = sock
        sock.listen(BACKLOG)  # connections queue from now on, before `serve_forever` begins
        self.server_address: tuple[Any, ...] = sock.getsockname()
        self.handle = handle
        self.workers = limits.workers or default_workers()
        self.max_connections = limits.max_connections or connection_cap()
        self.head_timeout = limits.head_timeout
        self.write_timeout = limits.write_timeout
        self.max_body = limits.max_body
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.open_connections = 0
        self._waiting: OrderedDict[int, asyncio.StreamWriter] = OrderedDict()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ips-view")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._done = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        self._started.set()
        try:
            asyncio.run(self._serve())
        finally:
            self._done.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait for it to return (safe from any thread but the serving one)."""
        self._stopping.set()
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already finished
                loop.call_soon_threadsafe(stop.set)
        if self._started.is_set():
            self._done.wait()

    def server_close(self) -> None:
        self.socket.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self._stop = asyncio.Event()
        self._loop = loop
        if self._stopping.is_set():
            return
        server = await asyncio.start_server(
            self._connection, sock=self.socket, backlog=BACKLOG, limit=HEAD_LIMIT
        )
        async with server:
            await self._stop.wait()
            for writer in list(self._waiting.values()):
                writer.transport.abort()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """One line, never a traceback (a full descriptor table, a socket error of the loop's own). A
        connection task cancelled at shutdown is not an error (Python 3.11's stream callback reports it
        as one when it asks the cancelled task for its exception)."""
        e = context.get("exception")
        if isinstance(e, asyncio.CancelledError):
            return
        detail = f"{type(e).__name__}: {e}" if e is not None else ""
        self.log(f"ips view: {context.get('message', 'event loop error')} {detail}".rstrip())

    # -- one connection ---------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        key = id(writer)
        transport = writer.transport
        try:
            if self.open_connections > self.max_connections and not self._make_room():
                await self._send(writer, BUSY)
                return
            self._waiting[key] = writer
            try:
                head = await asyncio.wait_for(_read_head(reader), self.head_timeout)
            finally:
                self._waiting.pop(key, None)
            if head is None:  # the client closed before a whole head
                return
            found = CONTENT_LENGTH.search(head)
            length = int(found.group(1)) if found else 0
            if length > max(self.max_body, DISCARD if not self.max_body else 0):
                if self.max_body:
                    await self._send(writer, BODY_TOO_LARGE)
                    return
                if length <= DRAIN:
                    await asyncio.wait_for(_drain(reader, length), self.head_timeout)
                length = 0  # refused: the handler answers 405 from the head alone
            if length:
                head += await asyncio.wait_for(reader.readexactly(length), self.head_timeout)
            peer = writer.get_extra_info("peername") or ("", 0)
            answer = await asyncio.get_running_loop().run_in_executor(self._pool, self.handle, head, peer[:2])
            await self._send(writer, answer)
        except _HeadTooLarge:
            await self._send(writer, TOO_LARGE)
        except (asyncio.TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError):
            transport.abort()  # idle, too slow, or gone: nothing to say
        except asyncio.CancelledError:
            transport.abort()
            raise
        except Exception as e:  # noqa: BLE001 - one line for anything else; the server goes on
            self.log(f"ips view: connection error ({type(e).__name__}: {e})")
            transport.abort()
        finally:
            self.open_connections -= 1
            if not transport.is_closing():
                transport.close()

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for its head; False if none is waiting."""
        if not self._waiting:
            return False
        _, oldest = self._waiting.popitem(last=False)
        oldest.transport.abort()
        return True

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write `data` in full (drained to the kernel), or drop the connection after `write_timeout` or
        when the client has gone."""
        try:
            writer.transport.set_write_buffer_limits(high=0)  # drain() returns once all is with the kernel
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self.write_timeout)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            writer.transport.abort()


class _HeadTooLarge(Exception):
    """A request head over `HEAD_LIMIT` bytes (answered 431)."""


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The request line and headers up to the empty line (leading empty lines skipped); a request line
    without a version (HTTP/0.9) is a whole head. None at end of input; `_HeadTooLarge` over the limit."""
    lines: list[bytes] = []
    size = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # a line longer than the stream's limit
            raise _HeadTooLarge from None
        if not line:
            return None
        if not lines and line in (b"\r\n", b"\n"):
            continue
        lines.append(line)
        size += len(line)
        if size > HEAD_LIMIT:
            raise _HeadTooLarge
        if line in (b"\r\n", b"\n") or (len(lines) == 1 and len(line.split()) < 3):
            return b"".join(lines)


async def _drain(reader: asyncio.StreamReader, length: int) -> None:
    """Read and drop `length` body bytes in pieces of at most `DISCARD` (nothing is kept)."""
    while length > 0:
        piece = await reader.read(min(length, DISCARD))
        if not piece:
            return
        length -= len(piece)

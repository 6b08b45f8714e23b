"""/metrics over HTTP from one thread running an asyncio loop, whatever the number of connections.

Why not prometheus_client's `start_http_server`: it starts a thread per connection and never times one
out, so anyone who can reach the port holds threads at will (300 idle connections -> 309 threads).
Here every connection is a coroutine on one loop: one request per connection (`Connection: close`,
which every scraper accepts), the whole exchange bounded by `timeout_s` (a connection idle, trickling
its request or not reading the answer is closed then), at most `max_connections` open at once (the
oldest is dropped for a new one, so held connections cannot lock a scraper out).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

# a scrape sends its request at once and reads the answer in milliseconds; 5 s covers a loaded host
TIMEOUT_S = 5.0
# scrapers are one or two Prometheus servers; the cap bounds file descriptors, not threads (one thread)
MAX_CONNECTIONS = 64
_MAX_HEAD_BYTES = 8192  # a GET with a few headers; a longer head is refused (431)
PATHS = ("/metrics", "/")


class MetricsServer:
    """Serves `registry` as Prometheus text on `host:port` (port 0: any free one) until `close()`."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, *, timeout_s: float = TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS):
        self.registry = registry
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._open: collections.OrderedDict[asyncio.StreamWriter, None] = collections.OrderedDict()  # oldest first
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        try:
            # bind here, on the caller's thread, so that a taken port is the caller's OSError
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, host, port, limit=_MAX_HEAD_BYTES))
        except BaseException:
            self._loop.close()
            raise
        self.address: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        self._thread = threading.Thread(target=self._loop.run_forever, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        """Connections open right now (read from another thread: a snapshot)."""
        return len(self._open)

    def close(self) -> None:
        if self._server is None:
            return

        async def stop() -> None:
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(self.timeout_s + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout_s + 5)
        self._loop.close()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while len(self._open) >= self.max_connections:
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.transport.abort()
        self._open[writer] = None
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._exchange(reader, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            writer.transport.abort()  # idle, slow or gone: nothing to tell it
        except Exception:
            log.exception("metrics request failed")
            writer.transport.abort()
        else:
            writer.close()  # after the answer is flushed
        finally:
            self._open.pop(writer, None)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await _reply(writer, 431, b"request head too large\n")
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await _reply(writer, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            await _reply(writer, 405, b"GET only\n", extra=b"Allow: GET, HEAD\r\n")
            return
        if urlsplit(target).path not in PATHS:
            await _reply(writer, 404, b"metrics are at /metrics\n")
            return
        accept = next((line.split(":", 1)[1].strip() for line in lines[1:]
                       if line.lower().startswith("accept:")), "")
        encode, content_type = choose_encoder(accept)
        body = encode(self.registry)  # milliseconds: collectors only read counters
        await _reply(writer, 200, body, content_type=content_type, head_only=method == "HEAD")


async def _reply(writer: asyncio.StreamWriter, status: int, body: bytes, *, content_type: str = "text/plain",
                 extra: bytes = b"", head_only: bool = False) -> None:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
              431: "Request Header Fields Too Large"}[status]
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n".encode() + extra + b"\r\n")
    if not head_only:
        writer.write(body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()

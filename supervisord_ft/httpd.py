"""A tiny read-only HTTP server on the daemon's own event loop, for scrapes and probes.

Not ``prometheus_client``'s server, which runs a thread per client. Each connection gets one
``GET`` and one response (HTTP/1.0 style, then close). What a client can cost is bounded:
request heads are capped at :data:`MAX_REQUEST_BYTES`, every connection at
:data:`CONNECTION_TIMEOUT` seconds in all (reading the request and writing the response), and
at most :data:`MAX_CONNECTIONS` are held; when one more arrives the oldest is dropped, so a
crowd of idle sockets cannot lock out the next probe. Handlers are plain functions that run
on the loop and must be quick.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError

MAX_REQUEST_BYTES = 8192
CONNECTION_TIMEOUT = 5.0
MAX_CONNECTIONS = 32
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Response]


class Server:
    """Serves ``routes`` (path → handler) until :meth:`close`."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self, key: str, addr: str, port: int) -> None:
        """Listen on ``addr:port``; :class:`ConfigError` naming ``key`` if that is impossible."""
        try:
            self._server = await asyncio.start_server(self._serve, addr, port,
                                                      limit=MAX_REQUEST_BYTES)
        except OSError as exc:
            name = f"{key}_port" if exc.errno == errno.EADDRINUSE else f"{key}_addr"
            why = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's strerror is long
            raise ConfigError(f"{name}: cannot listen on {addr}:{port}: {why}") from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._connections.values():
            writer.transport.abort()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=CONNECTION_TIMEOUT)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Connections are ended by aborting their transport, never by cancelling their task:
        # asyncio's stream callback reports a cancelled handler task as an error.
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_CONNECTIONS:
            self._connections.pop(next(iter(self._connections))).transport.abort()
        self._connections[task] = writer
        try:
            async with asyncio.timeout(CONNECTION_TIMEOUT):
                response = await self._respond(reader)
                if writer.transport.is_closing():  # evicted while it read
                    return
                writer.write(self._encode(response))
                await writer.drain()
            writer.close()
        except (TimeoutError, ConnectionError):
            writer.transport.abort()
        finally:
            self._connections.pop(task, None)

    async def _respond(self, reader: asyncio.StreamReader) -> Response:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return Response(431, b"request too large\n")
        except asyncio.IncompleteReadError as exc:
            head = exc.partial  # an HTTP/0.9-style request line without headers, or nothing
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) not in (2, 3):
            return Response(400, b"bad request line\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0].decode("ascii", "replace")
        if method != b"GET":
            return Response(405, b"read-only: GET only\n")
        route = self.routes.get(target)
        return route() if route is not None else Response(404, b"not found\n")

    @staticmethod
    def _encode(r: Response) -> bytes:
        head = (f"HTTP/1.0 {r.status} {REASONS[r.status]}\r\nContent-Type: {r.content_type}\r\n"
                f"Content-Length: {len(r.body)}\r\nConnection: close\r\n")
        if r.status == 405:
            head += "Allow: GET\r\n"
        return head.encode() + b"\r\n" + r.body

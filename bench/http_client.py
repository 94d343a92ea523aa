"""A keep-alive HTTP/1.1 connection for the load generator: requests written whole, responses parsed by httptools.

Why: the load generator shares the machine's two cores with the system it measures, so every millisecond of
client CPU is measured as the system's latency. aiohttp took 0.26-0.35 ms of CPU per request in ``bench_http``,
7% of a whole message's CPU; this takes a fraction of that. It is only what the benchmark needs: one request at a
time per connection, JSON bodies, responses with ``Content-Length`` (httptools, uvicorn's parser, handles the
framing). Real HTTP over TCP to the same port, through HAProxy, as any other client.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast
from urllib.parse import urlsplit

import httptools


class _Wire(asyncio.Protocol):
    """One TCP connection and its response parser."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body = bytearray()
        self.keep_alive = True

    def usable(self) -> bool:
        return self.keep_alive and self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCP transport is not asyncio's class

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ConnectionError(f"bad response: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep_alive = False
        self._fail(ConnectionError(f"connection lost: {exc}"))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # a ``Connection: close`` answer (say, a proxy reloading)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), bytes(self.body)))

    def _fail(self, error: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)


class HttpConnection:
    """A client's keep-alive connection; it opens a new one, as browsers and HTTP libraries do, when the server
    has closed it or said it would (HAProxy closes its idle connections when Serve reloads its configuration)."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.address = (host, port)
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self.wire = _Wire()

    @classmethod
    async def open(cls, base_url: str, headers: dict[str, str]) -> HttpConnection:
        url = urlsplit(base_url)
        if url.hostname is None or url.port is None:
            raise ValueError(f"need a host and a port: {base_url!r}")
        conn = cls(url.hostname, url.port, headers)
        await conn._connect()
        return conn

    async def _connect(self) -> None:
        self.close()
        self.wire = _Wire()
        await asyncio.get_running_loop().create_connection(lambda: self.wire, *self.address)

    async def request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, bytes]:
        """Send one request and return its status and body (a request may not overlap another on a connection)."""
        if not self.wire.usable():
            await self._connect()
        wire = self.wire
        assert wire.transport is not None
        data = b"" if body is None else json.dumps(body).encode()
        kind = "Content-Type: application/json\r\n" if body is not None else ""
        head = f"{method} {path} HTTP/1.1\r\n{self.head}{kind}Content-Length: {len(data)}\r\n\r\n"
        wire.body = bytearray()
        wire.waiter = asyncio.get_running_loop().create_future()
        wire.transport.write(head.encode() + data)
        async with asyncio.timeout(timeout):
            return await wire.waiter

    def close(self) -> None:
        if self.wire.transport is not None:
            self.wire.transport.close()

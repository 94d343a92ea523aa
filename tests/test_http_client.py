"""The benchmark's HTTP client against a local server that closes connections as a reloading proxy does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from bench.http_client import HttpConnection


class Server:
    """Answers every request with 200 and the request count; ``close_after`` answers end with ``Connection: close``
    and a close, ``drop_idle`` closes each connection a moment after its first answer, without saying so."""

    def __init__(self, close_after: bool = False, drop_idle: bool = False) -> None:
        self.close_after, self.drop_idle = close_after, drop_idle
        self.connections = self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.lower().split(b"\r\n")
                length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
                await reader.readexactly(length)
                self.requests += 1
                body = str(self.requests).encode()
                extra = b"Connection: close\r\n" if self.close_after else b""
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))
                await writer.drain()
                if self.close_after or self.drop_idle:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


Start = Callable[[Server], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Start]:
    servers: list[asyncio.Server] = []

    async def start(behaviour: Server) -> str:
        server = await asyncio.start_server(behaviour.handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for s in servers:
        s.close()


async def test_a_connection_close_answer_makes_the_next_request_reconnect(serve: Start) -> None:
    server = Server(close_after=True)
    conn = await HttpConnection.open(await serve(server), {})
    answers = [await conn.request("POST", "/x", {"n": i}) for i in range(3)]
    assert answers == [(200, b"1"), (200, b"2"), (200, b"3")]
    assert server.connections == 3
    conn.close()


async def test_a_connection_the_server_dropped_while_idle_is_opened_again(serve: Start) -> None:
    server = Server(drop_idle=True)
    conn = await HttpConnection.open(await serve(server), {})
    assert await conn.request("GET", "/x") == (200, b"1")
    await asyncio.sleep(0.1)  # the close reaches the client
    assert await conn.request("GET", "/x") == (200, b"2")
    assert server.connections == 2
    conn.close()


async def test_keep_alive_answers_share_one_connection(serve: Start) -> None:
    server = Server()
    conn = await HttpConnection.open(await serve(server), {})
    for i in range(1, 4):
        assert await conn.request("GET", "/x") == (200, str(i).encode())
    assert server.connections == 1
    conn.close()

"""Group commit: the appends one process makes at the same time share one round trip and one transaction.

A process that appends for many callers at once (the HTTP ingress for its clients, an agent runner for its
chats) would otherwise pay a round trip, a transaction and a WAL flush per append. Here the first append goes
at once; those that arrive while it is in flight wait and go together as the next batch, so nothing waits for a
timer and a busy process sends ever larger batches. Each append keeps its own outcome (storage/migrations/
0006_append_batch.sql). What is wrong with an append's own content (a NUL character, an integer beyond 64 bits,
an expected version out of range, the size) is raised to its caller before it joins a batch (``EventLog._prepare``),
so it breaks no batch. A database error that still breaks the whole batch (a duplicate event id, say) sends every
append of it back to be run alone, where it gets its own answer. A batch locks all its streams before its first
write (migration 0008), so per stream its events reach subscribers in version order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

MAX_APPENDS = 64
MAX_IN_FLIGHT = 2  # batches at once: Postgres works on one while the next is sent (both cores, on this machine)


def _future() -> asyncio.Future[list[Any] | None]:
    return asyncio.get_running_loop().create_future()


@dataclass
class PendingAppend:
    stream: str
    mode: str
    expected: int
    idempotency_key: str | None
    ids: list[Any]
    types: list[str]
    datas: list[str]  # JSON text (EventLog._prepare)
    metas: list[str]
    done: asyncio.Future[list[Any] | None] = field(default_factory=_future)


Flush = Callable[[list[PendingAppend]], Awaitable[list[Any]]]


class GroupCommit:
    def __init__(self, flush: Flush, max_appends: int = MAX_APPENDS, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._flush_batch = flush
        self.max_appends = max_appends
        self.max_in_flight = max_in_flight
        self._queue: list[PendingAppend] = []
        self._running = 0
        self.batches = 0

    async def append(self, pending: PendingAppend) -> list[Any] | None:
        """The rows ``agenthub_append_batch`` returned for this append, or ``None``: run it alone."""
        self._queue.append(pending)
        if self._running < self.max_in_flight:
            self._running += 1
            asyncio.get_running_loop().create_task(self._run())
        return await pending.done

    async def _run(self) -> None:
        try:
            await self._drain()
        finally:
            self._running -= 1

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_appends], self._queue[self.max_appends :]
            self.batches += 1
            try:
                rows = await self._flush_batch(batch)
            except asyncpg.PostgresError:
                self._settle(batch, [None] * len(batch))
                continue
            except Exception as e:  # the store is down (StoreUnavailable), or a bug: every caller hears of it
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(e)
                continue
            by_append: dict[int, list[Any]] = {}
            for r in rows:
                by_append.setdefault(r[0], []).append(r)
            self._settle(batch, [by_append.get(k, []) for k in range(1, len(batch) + 1)])

    @staticmethod
    def _settle(batch: list[PendingAppend], results: list[list[Any] | None]) -> None:
        for p, result in zip(batch, results, strict=True):
            with contextlib.suppress(asyncio.InvalidStateError):  # the caller gave up waiting
                p.done.set_result(result)

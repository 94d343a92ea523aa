"""Request/reply over the log: wait for the reply event caused by a request's message."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from events import RecordedEvent
from storage.eventlog import EventLog, Head

log = structlog.get_logger(__name__)
REPLY_TYPES = frozenset({"chat.reply_sent", "chat.reply_failed"})


IDLE_RESTART_S = 5.0


class ReplyWaiter:
    """One subscription per ingress replica, started at the head of the log; futures keyed by the message's id,
    which is its reply's causation id. Not its correlation id: a message appended through the raw events API may
    carry any correlation id, another waiting message's too, and its reply went to that message's request.

    A request registers its future *before* appending, so the reply cannot slip past unseen. Several requests
    may wait for one reply (concurrent retries of one idempotent request), so each key holds a list.

    While nobody waits, the subscription reads nothing, so its cursor stays where it was. The first request after
    ``idle_restart_s`` of that moves it to the head first (one query), instead of catching up on everything
    written meanwhile (a team at work writes thousands of events) before it can see its reply."""

    def __init__(self, store: EventLog, poll_interval: float = 0.5, idle_restart_s: float = IDLE_RESTART_S) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.idle_restart_s = idle_restart_s
        self.pending: dict[str, list[asyncio.Future[RecordedEvent]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._idle_since = time.monotonic()
        self._moving = asyncio.Lock()

    async def start(self) -> None:
        """Take the head here, not in the follower: a database that is down fails the caller (a 503, and the
        replica's next request opens again) instead of keeping it waiting while the follower retries."""
        if self._task is None:
            head = await self.store.head_cursor()
            self._task = asyncio.get_running_loop().create_task(self._follow(head))

    async def _follow(self, head: Head | None) -> None:
        while True:
            try:
                if head is None:
                    head = await self.store.head_cursor()
                # nobody waiting, nothing to read: a busy log (a team at work) costs the ingress no queries
                follow = self.store.subscribe(
                    head, poll_interval=self.poll_interval, types=REPLY_TYPES, active=lambda: bool(self.pending)
                )
                async for batch, _ in follow:
                    for e in batch:
                        if e.type in REPLY_TYPES and e.meta.causation_id is not None:
                            for fut in self.pending.pop(str(e.meta.causation_id), []):
                                if not fut.done():
                                    fut.set_result(e)
                    self._maybe_idle()
            except Exception as e:  # the store went away: wait and follow again from the new head
                log.warning("reply follower restarting", error=str(e))
                head = None
                await asyncio.sleep(0.5)

    def _stale(self) -> bool:
        return not self.pending and time.monotonic() - self._idle_since >= self.idle_restart_s

    async def expect(self, message_id: str) -> asyncio.Future[RecordedEvent]:
        """Register a wait for the reply to the message ``message_id``; call it before appending the message."""
        if self._task is not None and self._stale():
            async with self._moving:
                if self._stale():
                    # The head is taken before this caller appends its message, so its reply comes after it.
                    head = await self.store.head_cursor()
                    self._task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._task
                    self._task = asyncio.get_running_loop().create_task(self._follow(head))
                    self._idle_since = time.monotonic()
        fut: asyncio.Future[RecordedEvent] = asyncio.get_running_loop().create_future()
        self.pending.setdefault(message_id, []).append(fut)
        return fut

    def _maybe_idle(self) -> None:
        if not self.pending:
            self._idle_since = time.monotonic()

    def forget(self, message_id: str, fut: asyncio.Future[RecordedEvent]) -> None:
        """Stop waiting with ``fut`` (a no-op once the reply resolved it); other waiters for the key stay."""
        waiting = self.pending.get(message_id, [])
        if fut in waiting:
            waiting.remove(fut)
            if not waiting:
                del self.pending[message_id]
                self._maybe_idle()
        if not fut.done():
            fut.cancel()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

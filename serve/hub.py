"""Per-replica state of the HTTP ingress: the event log, the orchestrator handle and the reply waiter."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

from events import RecordedEvent
from serve.replies import REPLY_TYPES, ReplyWaiter
from storage.eventlog import EventLog
from storage.secrets import SecretStore


class Hub:
    def __init__(self, store: EventLog, orchestrator: object, *, reply_timeout_s: float) -> None:
        self.store = store
        self.orchestrator = orchestrator
        self.reply_timeout_s = reply_timeout_s
        self.waiter = ReplyWaiter(store)
        self.secrets = SecretStore(store)
        self.team_registered = False

    @staticmethod
    def new_agent_id() -> str:
        return "agent_" + secrets.token_hex(6)

    async def original_of(self, position: int) -> RecordedEvent:
        (event,) = await self.store.read_all(position - 1, limit=1)
        return event

    async def find_reply(self, message: RecordedEvent) -> RecordedEvent | None:
        """The reply already recorded for ``message`` (for a retried request), if any."""
        for e in await self.store.read_stream(message.stream, message.version + 1):
            if e.type in REPLY_TYPES and e.meta.correlation_id == message.id:
                return e
        return None

    async def actor_metrics(self) -> dict[str, bytes]:
        from actors.observability import export_metrics

        pages = {"ingress": export_metrics()}
        with contextlib.suppress(Exception):
            pages.update(await asyncio.wait_for(self.orchestrator.actor_metrics.remote(), 5))
        return pages

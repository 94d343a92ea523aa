"""The base of every Ray actor that receives routed events: an entity host behind ``deliver``."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import structlog

from actors import metrics
from actors.config import RuntimeConfig
from actors.entity import EntityHost
from actors.observability import configure_logging, export_metrics
from events import RecordedEvent
from storage.errors import StoreUnavailable
from storage.eventlog import Cursor, EventLog

log = structlog.get_logger(__name__)
CONCURRENCY = 8


class EntityActor:
    """Subclasses fill ``self.hosts`` (one entity host per stream category) in ``setup``; the orchestrator
    calls ``deliver`` with batches in order, and each event goes to the host of its stream's category."""

    def __init__(self, config: RuntimeConfig, subscriber: str) -> None:
        configure_logging()
        self.config = config
        self.subscriber = subscriber
        self.store: EventLog
        self.hosts: dict[str, EntityHost[Any]] = {}
        self.failures = 0
        self._ready = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        self.store = await EventLog.connect(
            self.config.database_url,
            max_size=CONCURRENCY + 2,
            max_event_bytes=self.config.max_event_bytes,
            run_migrations=False,
        )
        await self.setup()

    async def setup(self) -> None:
        raise NotImplementedError

    async def deliver(self, events: list[RecordedEvent], cursor: Cursor) -> Cursor:
        """Handle ``events``, then record ``cursor`` as this subscriber's checkpoint.

        Events of one entity are handled in order; different entities of a batch are handled concurrently (at
        most ``CONCURRENCY`` at a time), so one slow chat does not hold up the others. Effects are idempotent by
        causation id (see actors/entity.py), so a batch redelivered after a crash repeats no effect. A store
        outage propagates (the orchestrator redelivers later); any other handler error is logged and counted,
        so one poison message cannot stall the subscriber."""
        await self._ready
        groups: dict[tuple[str, str], list[RecordedEvent]] = {}
        for event in events:
            groups.setdefault(self.entity_of(event), []).append(event)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def run(group: list[RecordedEvent]) -> None:
            async with limit:
                for event in group:
                    await self._handle_one(event)

        results = await asyncio.gather(*(run(g) for g in groups.values()), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        await self.store.save_checkpoint(self.subscriber, cursor)
        return cursor

    def entity_of(self, event: RecordedEvent) -> tuple[str, str]:
        host = self.hosts.get(event.category)
        return (event.category, host.entity.key_of(event) if host else event.stream)

    async def _handle_one(self, event: RecordedEvent) -> None:
        try:
            await self.handle(event)
        except StoreUnavailable:
            raise
        except Exception:
            self.failures += 1
            log.exception("handler failed", subscriber=self.subscriber, event=str(event.id), type=event.type)
        metrics.ROUTED.labels(self.subscriber).inc()

    async def handle(self, event: RecordedEvent) -> None:
        """Route one event to the host of its category; subclasses may queue instead of handling at once."""
        await self.hosts[event.category].handle(event)

    async def ping(self) -> dict[str, Any]:
        await self._ready
        return {
            "subscriber": self.subscriber,
            "pid": os.getpid(),
            "active": sum(len(h.active) for h in self.hosts.values()),
            "handled": sum(h.handled for h in self.hosts.values()),
            "activations": sum(h.activations for h in self.hosts.values()),
            "failures": self.failures,
        }

    def metrics(self) -> bytes:
        return export_metrics()

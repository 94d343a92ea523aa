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
            max_size=4,
            max_event_bytes=self.config.max_event_bytes,
            run_migrations=False,
        )
        await self.setup()

    async def setup(self) -> None:
        raise NotImplementedError

    async def deliver(self, events: list[RecordedEvent], cursor: Cursor) -> Cursor:
        """Handle ``events`` in order, then record ``cursor`` as this subscriber's checkpoint.

        Effects are idempotent by causation id (see actors/entity.py), so a batch redelivered after a
        crash repeats no effect. A store outage propagates (the orchestrator redelivers later); any other
        handler error is logged and counted, so one poison message cannot stall the subscriber."""
        await self._ready
        for event in events:
            try:
                await self.handle(event)
            except StoreUnavailable:
                raise
            except Exception:
                self.failures += 1
                log.exception("handler failed", subscriber=self.subscriber, event=str(event.id), type=event.type)
            metrics.ROUTED.labels(self.subscriber).inc()
        await self.store.save_checkpoint(self.subscriber, cursor)
        return cursor

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

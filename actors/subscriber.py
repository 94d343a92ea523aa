"""The base of every Ray actor that receives routed events: an entity host behind ``deliver``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Coroutine
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
# Entities handled at once. Their appends share group-commit transactions, so more at once means fewer, larger
# commits: 8 → 32 cut the CPU per HTTP reply by about a fifth in alternating runs (docs/architecture.md).
CONCURRENCY = 32
POOL_SIZE = 10  # appends share a connection per batch; loads of new entities are what need the others
# How long a delivery waits for the one sent before it to arrive (Ray may start them out of order); one that never
# comes (its call failed: the orchestrator sends it again after a rewind) holds the next this long at most.
ORDER_WAIT_S = 2.0


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
        self._limit = asyncio.Semaphore(CONCURRENCY)
        self._entity_tails: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self._registered: Cursor | None = None  # the furthest end of a delivery whose events are registered
        self._arrived = asyncio.Condition()
        self._connected = False
        self._started = False
        self._starting: asyncio.Task[None] | None = None
        self._start_once()  # begin at once; every call waits for it

    @property
    def _ready(self) -> Awaitable[None]:
        """``await self._ready``: the actor's start is done. A start that failed (the database was away for a
        moment) is not kept: the next call starts again, so the actor recovers instead of failing every call."""
        return self._ensure_started()

    async def _ensure_started(self) -> None:
        if self._started:
            return
        task = self._starting
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._start_once()
        await asyncio.shield(task)  # a caller that gives up does not cancel the start others wait for

    def _start_once(self) -> asyncio.Task[None]:
        self._starting = asyncio.get_running_loop().create_task(self._start())
        self._starting.add_done_callback(self._start_done)
        return self._starting

    def _start_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning(
                "actor start failed; the next call tries again",
                subscriber=self.subscriber,
                error=repr(task.exception()),
            )

    async def _start(self) -> None:
        """Connect (once) and run ``setup``; run again after a failure, so ``setup`` must tolerate a second run
        after a partial first one."""
        if not self._connected:
            self.store = await EventLog.connect(
                self.config.database_url.get_secret_value(),
                max_size=POOL_SIZE,
                max_event_bytes=self.config.max_event_bytes,
                run_migrations=False,
            )
            self._connected = True
        await self.setup()
        self._started = True

    async def setup(self) -> None:
        raise NotImplementedError

    async def deliver(self, events: list[RecordedEvent], cursor: Cursor, after: Cursor | None = None) -> None:
        """Handle ``events``; return once they are handled.

        Events of one entity are handled in order; different entities are handled concurrently (at most
        ``CONCURRENCY`` at a time), so one slow chat does not hold up the others. The orchestrator may send the
        next delivery before this one is done: its events start at once, each after the same entity's events
        from earlier deliveries, and it may finish first (actors/deliveries.py keeps the orchestrator's cursor
        behind anything unfinished). The orchestrator also writes the checkpoint (batched, about once a second):
        effects are idempotent by causation id (see actors/entity.py), so what a crash redelivers repeats no
        effect, and a checkpoint write per delivery would only add a round trip to every reply. A store outage
        propagates (the orchestrator redelivers from its cursor), and fails the entity's later deliveries with it, so
        that they cannot overtake the redelivery; any other handler error is logged, counted and recorded by the
        entity if it has something to say (``Entity.crashed``), so one poison message cannot stall the subscriber.

        ``after`` is where the delivery sent before this one ended: Ray may start an async actor's calls out of
        order, so this one's events are registered only once that one's are (for up to ``ORDER_WAIT_S``). An
        ``after`` at or behind what is registered already (the first delivery, a redelivery after a rewind) waits
        for nothing."""
        await self._ready
        if after is not None:
            await self._in_turn(after)
        groups: dict[tuple[str, str], list[RecordedEvent]] = {}
        for event in events:
            groups.setdefault(self.entity_of(event), []).append(event)
        runs = [self._after_earlier(key, group) for key, group in groups.items()]  # queued in order, now
        self._registered = cursor if self._registered is None else max(self._registered, cursor)
        async with self._arrived:
            self._arrived.notify_all()
        for r in await asyncio.gather(*runs, return_exceptions=True):
            if isinstance(r, BaseException):
                raise r

    async def _in_turn(self, after: Cursor) -> None:
        def arrived() -> bool:
            return self._registered is None or after <= self._registered

        if arrived():
            return
        async with self._arrived:
            try:
                await asyncio.wait_for(self._arrived.wait_for(arrived), ORDER_WAIT_S)
            except TimeoutError:
                log.warning("the delivery before this one did not come; going on", subscriber=self.subscriber)

    def _after_earlier(self, key: tuple[str, str], group: list[RecordedEvent]) -> Coroutine[Any, Any, None]:
        """Handle ``group`` once the entity's events from earlier deliveries are done (registered before any
        await, so the order is the order of the deliveries)."""
        before, done = self._entity_tails.get(key), asyncio.get_running_loop().create_future()
        self._entity_tails[key] = done

        async def run() -> None:
            finished = False
            try:
                if before is not None and not await before:
                    # handling the entity's later events now would put them before the failed ones' redelivery
                    raise StoreUnavailable("an earlier delivery of this entity failed; both are delivered again")
                async with self._limit:
                    for event in group:
                        await self._handle_one(event)
                finished = True
            finally:
                done.set_result(finished)
                if self._entity_tails.get(key) is done:
                    del self._entity_tails[key]

        return run()

    def entity_of(self, event: RecordedEvent) -> tuple[str, str]:
        host = self.hosts.get(event.category)
        return (event.category, host.entity.key_of(event) if host else event.stream)

    async def _handle_one(self, event: RecordedEvent) -> None:
        try:
            await self.handle(event)
        except StoreUnavailable:
            raise
        except Exception as e:
            self.failures += 1
            log.exception("handler failed", subscriber=self.subscriber, event_id=str(event.id), type=event.type)
            await self._record_crash(event, e)
        metrics.ROUTED.labels(self.subscriber).inc()

    async def _record_crash(self, event: RecordedEvent, error: Exception) -> None:
        """Let the entity record the failure (``Entity.crashed``: a chat answers its message as failed), so that
        the event is not skipped in silence. An outage meanwhile propagates: the event is delivered again."""
        host = self.hosts.get(event.category)
        if host is None:
            return
        try:
            await host.record_crash(event, error)
        except StoreUnavailable:
            raise
        except Exception:
            log.exception("handler failure not recorded", subscriber=self.subscriber, event_id=str(event.id))

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

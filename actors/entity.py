"""Event-sourced entities and the host that activates, drives and passivates them.

An entity type is addressed as ``(actor type, key)`` and lives in stream ``<category>-<key>``. It is activated
on first use by folding its snapshot and events, handled with ``decide``/``evolve``, and passivated when the
host holds more than ``max_active`` entities. ``decide`` is called repeatedly for one message until it returns
nothing, so a multi-step reaction (say: a task's work, then its self-check, then the attempt) is durable step by
step and a redelivered message resumes where it stopped instead of repeating its effects.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar
from uuid import UUID

import structlog

from actors import metrics
from events import NewEvent, RecordedEvent
from storage.errors import EventTooLarge, InvalidEvent, StoreError, WrongExpectedVersion
from storage.eventlog import EventLog, gc_paused

log = structlog.get_logger(__name__)
S = TypeVar("S")

MAX_CONFLICT_RETRIES = 10
# How many of its newest causes an entity remembers (see ``Context``): a chat answers every message, so keeping
# them all made a long chat's memory and each of its snapshots grow with its length (DESIGN's trap 3).
REMEMBERED_CAUSES = 2000
# Decisions a host keeps for a crash to record (``EntityHost.unrecorded``); more is what outages left behind.
MAX_UNRECORDED = 256


@dataclass
class Spawn:
    """Events for another (usually new) stream, e.g. the tasks a CEO creates. Appended before the entity's own
    events with an idempotency key derived from the message, so a redelivered message spawns nothing twice."""

    stream: str
    events: list[NewEvent]

    # A decision returning only spawns would be decided again forever: it must record an event of its own.


@dataclass
class Context:
    """What the host knows about an entity besides its state: version and which events caused its events.

    Only the newest ``remembered`` causes are kept. That is enough for redelivery: the orchestrator delivers
    again only what came after a subscriber's persisted checkpoint, which trails at most two unfinished
    deliveries of 500 events and about a second of finished ones, and an entity handles its messages one at a
    time (an append each, a few milliseconds). A message redelivered after more than ``remembered`` newer causes
    of the same entity would be handled again."""

    stream: str
    version: int = 0
    caused: OrderedDict[str, list[str]] = field(default_factory=OrderedDict)
    remembered: int = REMEMBERED_CAUSES

    def effects_of(self, event: RecordedEvent) -> list[str]:
        """Types of the events this entity already emitted in reaction to ``event``."""
        return self.caused.get(str(event.id), [])

    def note(self, cause: str, effect_type: str) -> None:
        """Remember that ``cause`` led to an event of ``effect_type``, forgetting the oldest cause past the bound."""
        types = self.caused.get(cause)
        if types is not None:
            types.append(effect_type)
            return
        self.caused[cause] = [effect_type]
        if len(self.caused) > self.remembered:
            self.caused.popitem(last=False)


class Entity(Generic[S]):
    """Subclass with a ``category``, ``initial``, ``evolve`` and ``decide``; optionally snapshot hooks."""

    category: ClassVar[str]
    max_steps: ClassVar[int] = 16
    # Types of events that a decision which lost a version conflict still records (on the stream as it is then)
    # before deciding again: facts of the world that deciding again does not repeat, such as a paid completion.
    conflict_keeps: ClassVar[frozenset[str]] = frozenset()

    def initial(self) -> S:
        raise NotImplementedError

    def evolve(self, state: S, event: RecordedEvent) -> S:
        raise NotImplementedError

    async def decide(self, state: S, message: RecordedEvent, ctx: Context) -> list[NewEvent | Spawn]:
        raise NotImplementedError

    def refused(self, state: S, message: RecordedEvent, error: StoreError, decided: list[NewEvent]) -> list[NewEvent]:
        """Events recording that the log refused ``decided``, the decision for ``message``, for its content
        (``InvalidEvent``, ``EventTooLarge``: trying again cannot help). None by default: the handler fails and the
        message is logged and skipped. A chat answers it with a failure, so that its sender is not left waiting,
        and keeps what the refused completion cost."""
        return []

    def crashed(
        self, state: S, message: RecordedEvent, ctx: Context, error: Exception, decided: list[NewEvent]
    ) -> list[NewEvent]:
        """Events recording that deciding ``message`` kept failing with ``error``, an exception nothing expected (a
        bug, the machine), once its host's caller has stopped retrying (``EntityHost.record_crash``). ``decided``
        is the last decision for it that never reached the log (its completions were paid for), if any. None by
        default: the message is logged and skipped."""
        return []

    def key_of(self, message: RecordedEvent) -> str:
        """Which entity a routed message is for; by default the one whose stream it was appended to."""
        return message.stream_id

    def to_snapshot(self, state: S) -> dict[str, Any] | None:
        return None

    def from_snapshot(self, data: dict[str, Any]) -> S:
        raise NotImplementedError


def _caused_by(message: RecordedEvent, correlation: Any, actor: str, *batches: list[NewEvent]) -> None:
    """Stamp the events a message led to with their cause and correlation (and an actor, if none was set)."""
    for batch in batches:
        for e in batch:
            e.meta.causation_id = message.id
            e.meta.correlation_id = correlation
            e.meta.actor = e.meta.actor or actor


@dataclass
class Active(Generic[S]):
    state: S
    ctx: Context
    since_snapshot: int = 0


class EntityHost(Generic[S]):
    """Hosts the entities of one type inside one process (a Ray actor)."""

    def __init__(
        self,
        entity: Entity[S],
        store: EventLog,
        *,
        max_active: int = 1000,
        snapshot_every: int = 0,
        remembered_causes: int = REMEMBERED_CAUSES,
    ):
        self.entity = entity
        self.store = store
        self.max_active = max_active
        self.snapshot_every = snapshot_every
        self.remembered_causes = remembered_causes
        self.active: OrderedDict[str, Active[S]] = OrderedDict()
        # message id -> its last decision not appended: what a crash from there on had decided (and paid for)
        self.unrecorded: dict[UUID, list[NewEvent]] = {}
        self.handled = 0
        self.activations = 0

    def stream_of(self, key: str) -> str:
        return f"{self.entity.category}-{key}"

    def _apply(self, a: Active[S], event: RecordedEvent) -> None:
        a.state = self.entity.evolve(a.state, event)
        a.ctx.version = event.version
        if event.meta.causation_id is not None:
            a.ctx.note(str(event.meta.causation_id), event.type)
        a.since_snapshot += 1

    async def load(self, key: str) -> Active[S]:
        """Fold snapshot + events into a fresh in-memory entity."""
        stream = self.stream_of(key)
        a: Active[S] = Active(self.entity.initial(), Context(stream, remembered=self.remembered_causes))
        snap = await self.store.load_snapshot(stream)
        if snap is not None and "causes" in snap[1]:  # a snapshot without (its older form) is not used: refold
            a.ctx.version = snap[0]
            a.state = self.entity.from_snapshot(snap[1]["state"])
            for cause, types in snap[1]["causes"]:  # oldest first, as noted
                for t in types:
                    a.ctx.note(cause, t)
        with gc_paused():  # a long fold makes many short-lived objects: see storage/eventlog.py
            for event in await self.store.read_stream(stream, a.ctx.version + 1):
                self._apply(a, event)
        a.since_snapshot = 0
        self.activations += 1
        return a

    async def get(self, key: str) -> Active[S]:
        a = self.active.get(key)
        if a is None:
            a = await self.load(key)
            self.active[key] = a
            while len(self.active) > self.max_active:
                self.active.popitem(last=False)  # passivate the least recently used
            metrics.ACTIVE_ENTITIES.labels(self.entity.category).set(len(self.active))
        else:
            self.active.move_to_end(key)
        return a

    async def catch_up(self, a: Active[S]) -> None:
        for event in await self.store.read_stream(a.ctx.stream, a.ctx.version + 1):
            self._apply(a, event)

    async def handle(self, message: RecordedEvent) -> list[RecordedEvent]:
        """Run ``decide`` to completion for ``message``; returns the events appended."""
        started = time.perf_counter()
        key = self.entity.key_of(message)
        a = await self.get(key)
        if message.stream == a.ctx.stream and message.version > a.ctx.version:
            if message.version == a.ctx.version + 1:
                self._apply(a, message)  # the delivered message is the next event: no need to read it back
            else:
                await self.catch_up(a)
        appended: list[RecordedEvent] = []
        correlation = message.meta.correlation_id or message.id
        conflicts = 0
        self.unrecorded.pop(message.id, None)
        for _ in range(self.entity.max_steps):
            decided = await self.entity.decide(a.state, message, a.ctx)
            if not decided:
                break
            new = [e for e in decided if isinstance(e, NewEvent)]
            _caused_by(
                message, correlation, self.entity.category, new, *(sp.events for sp in decided if isinstance(sp, Spawn))
            )
            for sp in (d for d in decided if isinstance(d, Spawn)):
                await self.store.append(sp.stream, sp.events, idempotency_key=f"spawn:{message.id}:{sp.stream}")
            if not new:
                raise ValueError("a decision that spawns must also record an event of its own")
            self.unrecorded[message.id] = new
            while len(self.unrecorded) > MAX_UNRECORDED:  # left by outages whose message never came again
                del self.unrecorded[next(iter(self.unrecorded))]
            try:
                res = await self.store.append(a.ctx.stream, new, a.ctx.version)
            except WrongExpectedVersion:
                await self.catch_up(a)  # someone else wrote to the stream: reload and decide again
                kept = [e for e in new if e.type in self.entity.conflict_keeps]
                appended += await self._append_latest(a, lambda _, kept=kept: kept) if kept else []
                self.unrecorded[message.id] = [e for e in new if e.type not in self.entity.conflict_keeps]
                conflicts += 1
                if conflicts > MAX_CONFLICT_RETRIES:
                    raise
                continue
            except (InvalidEvent, EventTooLarge) as e:
                failed = self.entity.refused(a.state, message, e, new)
                if not failed:
                    raise
                log.warning("decision refused by the log; recorded as failed", entity=a.ctx.stream, error=str(e))
                _caused_by(message, correlation, self.entity.category, failed)
                res = await self.store.append(a.ctx.stream, failed, a.ctx.version)
                appended += self._applied(a, failed, res.positions, res.versions)
                break
            appended += self._applied(a, new, res.positions, res.versions)
            self.unrecorded.pop(message.id, None)  # recorded: a crash in a later step did not decide it
        else:
            log.error("decide did not settle", entity=a.ctx.stream, message=str(message.id))
        self.unrecorded.pop(message.id, None)
        self.handled += 1
        if self.snapshot_every and a.since_snapshot >= self.snapshot_every:
            await self.snapshot(a)
        metrics.HANDLER_LATENCY.labels(self.entity.category).observe(time.perf_counter() - started)
        return appended

    async def record_crash(self, message: RecordedEvent, error: Exception) -> list[RecordedEvent]:
        """Append what the entity says about ``message`` whose handling kept raising ``error`` (``Entity.crashed``),
        decided on its state as the log has it, so that what waits on it hears now instead of at a timeout."""
        decided = self.unrecorded.pop(message.id, [])
        key = self.entity.key_of(message)
        self.active.pop(key, None)  # the failed handling may have left the cached state half-way
        a = await self.get(key)
        correlation = message.meta.correlation_id or message.id

        def failed(state: S) -> list[NewEvent]:
            events = self.entity.crashed(state, message, a.ctx, error, decided)
            _caused_by(message, correlation, self.entity.category, events)
            return events

        return await self._append_latest(a, failed)

    async def _append_latest(self, a: Active[S], decide: Callable[[S], list[NewEvent]]) -> list[RecordedEvent]:
        """Append what ``decide`` makes of the entity's state, reloading and asking again after a conflict."""
        conflicts = 0
        while new := decide(a.state):
            try:
                res = await self.store.append(a.ctx.stream, new, a.ctx.version)
            except WrongExpectedVersion:
                conflicts += 1
                if conflicts > MAX_CONFLICT_RETRIES:
                    raise
                await self.catch_up(a)  # someone else wrote meanwhile
                continue
            return self._applied(a, new, res.positions, res.versions)
        return []

    def _applied(
        self, a: Active[S], new: list[NewEvent], positions: list[int], versions: list[int]
    ) -> list[RecordedEvent]:
        """Fold events just appended into the entity, without reading them back."""
        recorded = [e.recorded(a.ctx.stream, v, p) for e, p, v in zip(new, positions, versions, strict=True)]
        for rec in recorded:
            self._apply(a, rec)
        return recorded

    async def snapshot(self, a: Active[S]) -> None:
        data = self.entity.to_snapshot(a.state)
        if data is not None:
            # a list, not an object: jsonb keeps no key order, and the order says which causes to forget first
            causes = list(a.ctx.caused.items())
            await self.store.save_snapshot(a.ctx.stream, a.ctx.version, {"state": data, "causes": causes})
            a.since_snapshot = 0

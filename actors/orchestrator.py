"""The orchestrator: tails the log, routes events to subscribed actors, supervises them, fires timers.

One reader fans out to every subscriber. Each subscriber has its own queue and its own deliveries, in order:
a slow subscriber (an agent waiting seconds for its LLM) never holds up another, and the reader pauses only
when some subscriber has a long backlog. An agent runner may hold two deliveries at once, so a message that
arrives while its runner is busy starts at once (the runner keeps each chat in order, actors/subscriber.py;
the cursor moves past a delivery only when every earlier one is done too, actors/deliveries.py). A subscriber
whose actor died is restarted and its cursor reset to its stored checkpoint, so the reader rewinds and
redelivers what was not recorded as done.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import ray
import structlog
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from actors import metrics
from actors.agents.agent import agent_stream
from actors.agents.runner import AgentRunner, runner_name, runner_subscription
from actors.config import RuntimeConfig
from actors.deliveries import Delivery, InFlight
from actors.llm.actor import LLMActor
from actors.observability import configure_logging, export_metrics
from actors.projections import PROJECTOR, SUBSCRIPTION, Projector
from events import NewEvent, RecordedEvent, Subscription
from events.hub import AgentFailed, AgentRestarted
from events.system import SubscriberRegistered, TimerFired
from storage.errors import StoreUnavailable
from storage.eventlog import HELD_BACK_RETRY_S, START, Cursor, EventLog, Listener

log = structlog.get_logger(__name__)

DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)
BATCH = 500
MAX_PENDING = 5 * BATCH  # a subscriber's backlog at which the reader waits for it
RUNNER_IN_FLIGHT = 2
PROJECTOR_LINGER_S = 0.05  # read models trail the log by up to this much, in exchange for larger batches
LIFECYCLE = ("agent.started", "agent.stopped", "agent.deleted", "agent.updated", "agent.failed")


@dataclass
class Sub:
    subscription: Subscription
    factory: Callable[[], Any]
    handle: Any = None
    cursor: Cursor = START  # handled: delivered and acknowledged up to here
    queued: Cursor = START  # read: every matching event up to here is handled, in flight or pending
    persisted: Cursor = START
    pending: list[RecordedEvent] = field(default_factory=list)
    window: InFlight = field(default_factory=InFlight)  # this epoch's deliveries, in the order sent
    in_flight: int = 0  # calls not yet returned, of any epoch
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while nothing is in flight
    max_in_flight: int = 1
    linger_s: float = 0.0  # wait this long after a delivery before the next: fewer, larger batches
    last_sent: float = 0.0
    pump_later: asyncio.TimerHandle | None = None
    epoch: int = 0  # moves on every rewind, so a delivery from before it changes nothing
    attempts: int = 0
    dead: bool = False
    agent_id: str | None = None
    delivering_since: float | None = None


@dataclass(order=True)
class Timer:
    fire_at: float
    timer_id: str = field(compare=False)
    event: RecordedEvent = field(compare=False)


class OrchestratorImpl:
    def __init__(self, config: RuntimeConfig) -> None:
        configure_logging()
        self.config = config
        self.ns = config.namespace
        self.subs: dict[str, Sub] = {}
        self.timers: list[Timer] = []
        self.fired: set[str] = set()
        self.cursor: Cursor = START
        self.wake = asyncio.Event()
        self.throttled = False
        self.held_back = False
        self.timer_wake = asyncio.Event()
        self.routed = 0
        self.started_at = time.time()
        self.ready = asyncio.Event()
        self._main = asyncio.get_running_loop().create_task(self._run())

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                self.store = await EventLog.connect(
                    self.config.database_url, max_size=6, max_event_bytes=self.config.max_event_bytes
                )
                break
            except StoreUnavailable as e:
                log.warning("orchestrator waiting for the event store", error=str(e))
                await asyncio.sleep(1)
        self.llm = LLMActor.options(name="llm", namespace=self.ns, get_if_exists=True).remote(self.config)
        await self._restore()
        self.listener = Listener(self.config.database_url, self.wake)
        await self.listener.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._supervise()), loop.create_task(self._fire_timers())]
        self.ready.set()
        await self._route_forever()

    async def _restore(self) -> None:
        """Rebuild routing state from the log: running agents, pending timers, subscriber checkpoints."""
        self.cursor = await self.store.head_cursor()
        running: dict[str, RecordedEvent] = {}
        for e in await self._read_types(LIFECYCLE):
            if e.type == "agent.started":
                running[e.stream_id] = e
            elif e.type in ("agent.stopped", "agent.deleted", "agent.failed"):
                running.pop(e.stream_id, None)
        for agent_id, started in running.items():
            await self._add_agent(agent_id, started)
        projector = await self._add_sub(Subscription.model_validate(SUBSCRIPTION), self._projector_factory)
        projector.linger_s = PROJECTOR_LINGER_S
        for e in await self._read_types(("subscriber.registered",)):
            await self._add_registered(SubscriberRegistered.model_validate(e.data))
        for e in await self._read_types(("timer.scheduled", "timer.fired")):
            self._track_timer(e)

    async def _read_types(self, types: tuple[str, ...]) -> list[RecordedEvent]:
        out: list[RecordedEvent] = []
        pos = 0
        while batch := await self.store.read_all(pos, types=types, limit=5000):
            out.extend(batch)
            pos = batch[-1].position
        return out

    def _projector_factory(self) -> Any:
        return Projector.options(name=PROJECTOR, namespace=self.ns, get_if_exists=True).remote(self.config)

    async def _add_sub(
        self,
        subscription: Subscription,
        factory: Callable[[], Any],
        start: Cursor = START,
        agent_id: str | None = None,
        max_in_flight: int = 1,
    ) -> Sub:
        sub = Sub(subscription, factory, agent_id=agent_id, max_in_flight=max_in_flight)
        sub.idle.set()
        sub.handle = factory()
        stored = await self.store.load_checkpoint(subscription.name)
        sub.cursor = sub.queued = sub.persisted = stored if stored != START else start
        self.subs[subscription.name] = sub
        self.wake.set()
        return sub

    async def _add_agent(self, agent_id: str, started: RecordedEvent) -> None:
        name = runner_name(agent_id)
        if name in self.subs:
            return

        def factory() -> Any:
            return AgentRunner.options(name=name, namespace=self.ns, get_if_exists=True).remote(self.config, agent_id)

        # A new agent's messages all come after its start event: begin there, not at the start of the log.
        before = (started.tx_id, started.position - 1) if started.tx_id else START
        await self._add_sub(runner_subscription(agent_id), factory, before, agent_id, RUNNER_IN_FLIGHT)

    async def _remove_sub(self, name: str) -> None:
        sub = self.subs.pop(name, None)
        if sub is not None:
            sub.dead = True  # its deliveries in flight end here
        if sub is not None and sub.handle is not None:
            with contextlib.suppress(Exception):
                ray.kill(sub.handle, no_restart=True)

    # ---- routing -----------------------------------------------------------------------------------

    async def _route_forever(self) -> None:
        last_flush = time.monotonic()
        while True:
            self.wake.clear()
            try:
                batch = await self._route_once()
                if time.monotonic() - last_flush > 1.0:
                    await self._flush_cursors()
                    last_flush = time.monotonic()
            except StoreUnavailable as e:
                log.warning("routing paused: event store unavailable", error=str(e))
                await asyncio.sleep(0.5)
                continue
            except Exception:  # the router must outlive any one bad batch: log it and try again
                log.exception("routing step failed")
                await asyncio.sleep(0.5)
                continue
            # A short batch was everything visible: wait for the next commit's NOTIFY (one that came meanwhile
            # has set ``wake`` already) instead of asking again at once. A backlog waits for a delivery to end.
            if len(batch) < BATCH or any(s.dead for s in list(self.subs.values())):
                wait = HELD_BACK_RETRY_S if self.held_back else self.config.poll_interval_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), wait)

    async def _route_once(self) -> list[RecordedEvent]:
        live = [s for s in list(self.subs.values()) if not s.dead]
        self.throttled = any(len(s.pending) >= MAX_PENDING for s in live)
        if self.throttled:
            return []
        low = min([self.cursor, *(s.queued for s in live)])
        batch, _, self.held_back = await self.store.read_committed(low, BATCH)
        if batch:
            await self._own(batch)
            for sub in list(self.subs.values()):
                self._enqueue(sub, batch)
        return batch

    async def _own(self, batch: list[RecordedEvent]) -> None:
        """The orchestrator's own subscription: agent lifecycle and timers."""
        for e in batch:
            if e.cursor <= self.cursor:
                continue
            if e.type == "agent.started":
                await self._add_agent(e.stream_id, e)
            elif e.type in ("agent.stopped", "agent.deleted"):
                await self._remove_sub(runner_name(e.stream_id))
            elif e.type == "agent.updated":
                sub = self.subs.get(runner_name(e.stream_id))
                if sub is not None and not sub.dead:
                    with contextlib.suppress(*DEAD):
                        await sub.handle.reload_config.remote()
            elif e.type in ("timer.scheduled", "timer.fired"):
                self._track_timer(e)
        self.cursor = max(self.cursor, batch[-1].cursor)

    def _enqueue(self, sub: Sub, batch: list[RecordedEvent]) -> None:
        end = batch[-1].cursor
        if sub.dead or end <= sub.queued:
            return
        sub.pending.extend(e for e in batch if e.cursor > sub.queued and sub.subscription.matches(e))
        sub.queued = end
        self._pump(sub)

    def _pump(self, sub: Sub) -> None:
        """Start deliveries of ``sub``'s pending events, up to its limit; with nothing left to deliver, its cursor
        moves to what was read (events it does not subscribe to need no acknowledgement)."""
        while not sub.dead and sub.in_flight < sub.max_in_flight:
            if not sub.pending:
                if sub.in_flight == 0:
                    sub.cursor = max(sub.cursor, sub.queued)
                return
            wait = sub.last_sent + sub.linger_s - time.monotonic()
            if wait > 0 and len(sub.pending) < BATCH:
                if sub.pump_later is None:
                    sub.pump_later = asyncio.get_running_loop().call_later(wait, self._pump_now, sub)
                return
            sub.last_sent = time.monotonic()
            events, sub.pending = sub.pending[:BATCH], sub.pending[BATCH:]
            end = events[-1].cursor if sub.pending else sub.queued
            sub.in_flight += 1
            sub.idle.clear()
            sub.delivering_since = sub.delivering_since or time.time()
            delivery = sub.window.sent(end)
            asyncio.get_running_loop().create_task(self._deliver(sub, events, delivery, sub.epoch))

    def _pump_now(self, sub: Sub) -> None:
        sub.pump_later = None
        self._pump(sub)

    def _rewind(self, sub: Sub) -> None:
        """Forget what was queued past the handled cursor: the reader reads it again."""
        sub.epoch += 1
        sub.pending = []
        sub.window.clear()
        sub.queued = sub.cursor

    async def _deliver(self, sub: Sub, events: list[RecordedEvent], delivery: Delivery, epoch: int) -> None:
        current = True
        try:
            saved = await sub.handle.deliver.remote(events, delivery.end)  # the cursor it checkpointed, if any
        except DEAD as e:
            if epoch == sub.epoch and not sub.dead and self.subs.get(sub.subscription.name) is sub:
                log.warning("subscriber died", subscriber=sub.subscription.name, error=str(e))
                sub.dead = True
                reason = f"died during delivery: {type(e).__name__}"
                asyncio.get_running_loop().create_task(self._restart(sub, reason))
            return
        except Exception as e:  # the store was down inside the actor: redeliver from the handled cursor
            if epoch == sub.epoch:
                log.warning("delivery failed, will retry", subscriber=sub.subscription.name, error=str(e))
                self._rewind(sub)
                await asyncio.sleep(0.2)
                self.wake.set()
            return
        finally:
            sub.in_flight -= 1
            if sub.in_flight == 0:
                sub.delivering_since = None
                sub.idle.set()
            current = epoch == sub.epoch
            if current:
                self._pump(sub)
            if self.throttled:
                self.wake.set()
        if not current:
            return
        handled = sub.window.finished(delivery)
        if handled is not None:
            sub.cursor = max(sub.cursor, handled)
        if saved is not None:
            sub.persisted = max(sub.persisted, saved)
        sub.attempts = 0
        self.routed += len(events)
        metrics.ROUTING_LAG.labels(sub.subscription.name).set(
            max(0.0, time.time() - events[-1].recorded_at.timestamp())
        )

    async def _flush_cursors(self) -> None:
        """Persist, in one round trip, the cursors no subscriber checkpointed itself: those of entity actors and
        of subscribers that had nothing to handle. A restart rereads at most a second's events, which entity
        actors handle idempotently."""
        moved = {name: sub for name, sub in self.subs.items() if not sub.dead and sub.cursor > sub.persisted}
        if not moved:
            return
        cursors = {name: sub.cursor for name, sub in moved.items()}
        with contextlib.suppress(StoreUnavailable):
            await self.store.save_checkpoints(cursors)
            for name, sub in moved.items():
                sub.persisted = max(sub.persisted, cursors[name])

    # ---- supervision -------------------------------------------------------------------------------

    async def _restart(self, sub: Sub, reason: str) -> None:
        name = sub.subscription.name
        sub.attempts += 1
        metrics.ACTOR_RESTARTS.labels(name).inc()
        with contextlib.suppress(Exception):
            ray.kill(sub.handle, no_restart=True)
        if sub.agent_id is not None:
            stream = agent_stream(sub.agent_id)
            if sub.attempts > self.config.max_restart_attempts:
                await self.store.append(stream, [NewEvent.of(AgentFailed(reason=f"gave up after {reason}"))])
                self.subs.pop(name, None)
                return
            await self.store.append(stream, [NewEvent.of(AgentRestarted(attempt=sub.attempts, reason=reason))])
        for _ in range(50):  # the name is released asynchronously after a kill
            try:
                sub.handle = sub.factory()
                await asyncio.wait_for(sub.handle.ping.remote(), 30)
                break
            except (*DEAD, TimeoutError, ValueError):
                await asyncio.sleep(0.2)
        sub.cursor = sub.persisted = await self.store.load_checkpoint(name)
        self._rewind(sub)
        sub.dead = False
        log.info("subscriber restarted", subscriber=name, attempt=sub.attempts, redeliver_from=sub.cursor[1])
        self.wake.set()

    async def _supervise(self) -> None:
        """Ping every subscriber each heartbeat interval; restart the ones that do not answer."""
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            for sub in list(self.subs.values()):
                if sub.dead:
                    continue
                try:
                    await asyncio.wait_for(sub.handle.ping.remote(), max(5.0, self.config.heartbeat_interval_s))
                except (*DEAD, TimeoutError, GetTimeoutError) as e:
                    if sub.dead or self.subs.get(sub.subscription.name) is not sub:
                        continue
                    sub.dead = True
                    await self._restart(sub, f"missed heartbeat: {type(e).__name__}")

    # ---- timers ------------------------------------------------------------------------------------

    def _track_timer(self, e: RecordedEvent) -> None:
        tid = e.data["timer_id"]
        if e.type == "timer.fired":
            self.fired.add(tid)
        elif tid not in self.fired:
            fire_at = datetime.fromisoformat(e.data["fire_at"]).timestamp()
            heapq.heappush(self.timers, Timer(fire_at, tid, e))
            self.timer_wake.set()

    async def _fire_timers(self) -> None:
        while True:
            self.timer_wake.clear()
            while self.timers and self.timers[0].timer_id in self.fired:
                heapq.heappop(self.timers)
            delay = (self.timers[0].fire_at - time.time()) if self.timers else 3600.0
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.timer_wake.wait(), delay)
                continue
            t = self.timers[0]
            fired = NewEvent.of(
                TimerFired(timer_id=t.timer_id, scheduled_position=t.event.position, payload=t.event.data["payload"]),
                causation_id=t.event.id,
                correlation_id=t.event.meta.correlation_id or t.event.id,
                actor="orchestrator",
            )
            try:
                # the idempotency key makes a timer fire once, even if a restart fires it again
                await self.store.append(t.event.data["target_stream"], [fired], idempotency_key=f"timer:{t.timer_id}")
            except StoreUnavailable:
                await asyncio.sleep(0.5)
                continue
            heapq.heappop(self.timers)
            self.fired.add(t.timer_id)

    # ---- API ---------------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        await self.ready.wait()
        router = "running"
        if self._main.done():
            router = "cancelled" if self._main.cancelled() else f"stopped: {self._main.exception()!r}"
        return {
            "router": router,
            "cursor": list(self.cursor),
            "routed": self.routed,
            "pending_timers": sum(1 for t in self.timers if t.timer_id not in self.fired),
            "uptime_s": round(time.time() - self.started_at, 1),
            "subscribers": {
                n: {
                    "position": s.cursor[1],
                    "pending": len(s.pending),
                    "in_flight": s.in_flight,
                    "dead": s.dead,
                    "restarts": s.attempts,
                    "delivering_for_s": round(time.time() - s.delivering_since, 1) if s.delivering_since else None,
                }
                for n, s in self.subs.items()
            },
        }

    async def wait_routed(self, subscriber: str, position: int, timeout: float = 10.0) -> bool:
        """True once ``subscriber`` has handled everything up to ``position`` (for read-your-writes)."""
        await self.ready.wait()
        target = await self.store.cursor_at(position)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sub = self.subs.get(subscriber)
            if sub is not None and sub.cursor >= target and not sub.dead:
                return True
            await asyncio.sleep(0.01)
        return False

    async def register(self, subscription: Subscription, actor: str, args: list[Any] | None = None) -> None:
        """Route ``subscription`` to a Ray actor ``actor`` (``module:Class`` of a ``ray.remote`` class, built as
        ``Class(runtime_config, *args)``). Recorded in the log, so it survives orchestrator restarts."""
        await self.ready.wait()
        if subscription.name in self.subs:
            return
        reg = SubscriberRegistered(subscription=subscription.model_dump(mode="json"), actor=actor, args=args or [])
        await self.store.append(
            "system-subscribers",
            [NewEvent.of(reg, actor="orchestrator")],
            idempotency_key=f"register:{subscription.name}",
        )
        await self._add_registered(reg)

    async def _add_registered(self, reg: SubscriberRegistered) -> None:
        subscription = Subscription.model_validate(reg.subscription)
        if subscription.name in self.subs:
            return
        module, _, cls_name = reg.actor.partition(":")
        actor_class = getattr(importlib.import_module(module), cls_name)

        def factory() -> Any:
            return actor_class.options(name=subscription.name, namespace=self.ns, get_if_exists=True).remote(
                self.config, *reg.args
            )

        await self._add_sub(subscription, factory)

    async def rebuild_projection(self) -> int:
        """Empty the hub's read models and replay the whole log into them; returns events projected."""
        await self.ready.wait()
        sub = self.subs[PROJECTOR]
        sub.dead = True  # pause deliveries while the tables are emptied
        await sub.idle.wait()
        await sub.handle.rebuild.remote()
        sub.cursor = sub.persisted = START
        self._rewind(sub)
        sub.dead = False
        self.wake.set()
        head = await self.store.head()
        if head:
            await self.wait_routed(PROJECTOR, head, timeout=300)
        return int((await sub.handle.ping.remote())["projected"])

    async def actor_metrics(self) -> dict[str, bytes]:
        out = {"orchestrator": export_metrics()}
        for name, sub in list(self.subs.items()):
            if sub.dead:
                continue
            with contextlib.suppress(Exception):
                out[name] = await asyncio.wait_for(sub.handle.metrics.remote(), 2)
        with contextlib.suppress(Exception):
            out["llm"] = await asyncio.wait_for(self.llm.metrics.remote(), 2)
        return out

    async def ping(self) -> dict[str, Any]:
        return {"ready": self.ready.is_set(), "subscribers": len(self.subs)}


Orchestrator = ray.remote(num_cpus=0, max_restarts=-1)(OrchestratorImpl)

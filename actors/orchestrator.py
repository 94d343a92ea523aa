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
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import ray
import structlog
from prometheus_client import Counter
from pydantic import ValidationError
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from actors import metrics
from actors.agents.agent import agent_stream
from actors.agents.runner import RUNNER_PREFIX, AgentRunner, runner_name, runner_subscription
from actors.config import RuntimeConfig
from actors.deliveries import Delivery, InFlight
from actors.entity import MAX_CONFLICT_RETRIES
from actors.held_back import HoldWatch
from actors.llm.actor import LLMActor
from actors.observability import configure_logging, export_metrics
from actors.projections import PROJECTOR, SUBSCRIPTION, Projector
from events import NewEvent, RecordedEvent, Subscription, UnknownEventType
from events.hub import AgentFailed, AgentRestarted, ReplyFailed
from events.system import SubscriberRegistered, TimerFailed, TimerFired
from storage.errors import EventTooLarge, InvalidEvent, StoreUnavailable, WrongExpectedVersion
from storage.eventlog import START, Cursor, EventLog, Listener, held_back_wait, wait_at_most

log = structlog.get_logger(__name__)
T = TypeVar("T")

DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)
BATCH = 500
MAX_PENDING = 5 * BATCH  # a subscriber's backlog at which the reader stops reading for it (not for the others)
RUNNER_IN_FLIGHT = 2
# A runner's delivery returns once its events are handled, so a chat waiting on a slow model held up the agent's
# other chats behind it: when every delivery in flight has been out this long, one more may go, up to the most.
STALLED_S = 0.25
RUNNER_MAX_STALLED = 32
# Read models trail the log by up to this much, in exchange for larger batches: each delivery costs the projector a
# Ray call, a transaction and a checkpoint, which at 0.05 s were half its CPU (0.16-0.19 against 0.08-0.11 ms a
# message at 0.2 s, alternating rounds of bench_http's load; docs/benchmarks.md).
PROJECTOR_LINGER_S = 0.2
LIFECYCLE = ("agent.started", "agent.stopped", "agent.deleted", "agent.updated", "agent.failed")
TIMER_TYPES = ("timer.scheduled", "timer.fired", "timer.failed")
# The snapshots row with the timers the log has armed as of a cursor: a restart reads the timer events after it,
# not every one ever written (a team's CEO loop and task timeouts schedule timers all day).
TIMERS_SNAPSHOT = "orchestrator-timers"
TIMERS_SNAPSHOT_IDLE_S = 30.0  # with no timer event meanwhile, the snapshot's cursor still moves this often
RETRY_S = 0.2  # a failed delivery is sent again after this, doubled for each failure in a row ...
RETRY_MAX_S = 5.0  # ... up to this
# a timer that fails with one of these will never fire: it is recorded as failed; any other failure is retried
UNFIREABLE = (InvalidEvent, EventTooLarge, UnknownEventType, ValidationError)
FAULTS_BEFORE_RESTART = 5  # failures in a row (deliveries, or pings) other than a store outage: restart the actor
RELOAD_WAIT_S = 5.0  # the reader waits this long for a runner's reload_config before it moves on
RELOAD_ATTEMPTS = 8
START_RETRY_MAX_S = 10.0

SKIPPED = Counter(
    "agenthub_orchestrator_skipped_total",
    "Registrations and timers the orchestrator could not act on, logged and skipped",
    ["kind"],
)


def existing_actors(names: set[str], namespace: str) -> dict[str, Any]:
    """Handles of the live actors among ``names`` in ``namespace`` (one listing, then a lookup per one found).
    Nothing outside Ray: ``ray.get_actor`` would start one."""
    if not names or not ray.is_initialized():
        return {}
    found: dict[str, Any] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == namespace and actor["name"] in names:
            with contextlib.suppress(ValueError):  # gone meanwhile
                found[actor["name"]] = ray.get_actor(actor["name"], namespace=namespace)
    return found


def _backoff(failures: int) -> float:
    return min(RETRY_MAX_S, RETRY_S * 2 ** max(0, failures - 1))


SYSTEM_ACTORS = frozenset({PROJECTOR, "llm", "orchestrator"})


def _reserved(name: str) -> bool:
    """A Ray name a registered subscriber must not take: a system actor's, or one an agent's runner may take."""
    return name in SYSTEM_ACTORS or name.startswith(RUNNER_PREFIX)


def _same_routing(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two recorded registrations route alike (compared as models: a set's order in JSON is arbitrary)."""

    def routing(data: dict[str, Any]) -> tuple[Subscription, str, list[Any]]:
        reg = SubscriberRegistered.model_validate(data)
        return Subscription.model_validate(reg.subscription), reg.actor, reg.args

    return routing(a) == routing(b)


def actor_class(path: str) -> Any:
    """The ``ray.remote`` class named by ``module:Class``; raises if it does not import or is not one."""
    module, sep, cls_name = path.partition(":")
    if not sep or not module or not cls_name:
        raise ValueError(f"expected 'module:Class', got {path!r}")
    cls = getattr(importlib.import_module(module), cls_name)
    if not callable(getattr(cls, "options", None)):
        raise TypeError(f"{path} is not a ray.remote actor class")
    return cls


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
    max_stalled: int = 0  # in flight at most while the deliveries out are stalled (STALLED_S); 0: no more
    sent_end: Cursor = START  # where the last delivery sent in this epoch ends: the next one's ``after``
    linger_s: float = 0.0  # wait this long after a delivery before the next: fewer, larger batches
    awaited: int = 0  # readers waiting for it to catch up (``wait_routed``): no linger while one waits
    last_sent: float = 0.0
    retry_at: float = 0.0  # after a failed delivery, send nothing before this (monotonic clock)
    pump_later: asyncio.TimerHandle | None = None
    epoch: int = 0  # moves on every rewind, so a delivery from before it changes nothing
    attempts: int = 0  # restarts since every event a death was in flight with was handled
    died_through: Cursor = START  # the end of the furthest delivery in flight when its actor died
    lone_at_death: RecordedEvent | None = None  # the only event in flight when its actor last died in a delivery
    failures: int = 0  # deliveries failed in a row, for any reason (the retry delay)
    faults: int = 0  # deliveries failed in a row, store outages aside (a restart at FAULTS_BEFORE_RESTART)
    ping_faults: int = 0  # pings failed in a row, store outages aside
    dead: bool = False  # its actor is gone: a restart is under way, or failed and is tried again by supervision
    restarting: bool = False
    restart_reason: str | None = None  # set while dead and not yet restarted
    paused: bool = False  # nothing is delivered (a projection rebuild); still supervised
    agent_id: str | None = None
    delivering_since: float | None = None
    reload_waiters: list[asyncio.Future[None]] = field(default_factory=list)
    reloading: asyncio.Task[None] | None = None
    # an update came while it was dead: the new runner may have folded its config before it, so it reloads once up
    reload_when_up: bool = False

    @property
    def active(self) -> bool:
        return not self.dead and not self.paused


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
        self.registrations: dict[str, dict[str, Any]] = {}  # what routes each registered subscriber, as recorded
        self._registering = asyncio.Lock()
        # Pending timers by id, and a heap of them by time. A timer that fires, fails or is seen fired leaves
        # ``pending`` at once and the heap when it comes to the top. Nothing is kept for a timer once it is done
        # (a set of every fired id grew for as long as the system ran). Each event is acted on once (``_own``
        # goes by the orchestrator's cursor) and a restart reads a timer's scheduling before its firing; were a
        # done timer ever scheduled again, firing it into its idempotency key would append nothing.
        self.pending: dict[str, Timer] = {}
        self.timers: list[Timer] = []
        # What the log says is armed (scheduled, not yet seen fired or failed), as of ``self.cursor``: snapshotted
        # for the next restart. Unlike ``pending``, a firing in flight does not take a timer out of it.
        self.armed: dict[str, RecordedEvent] = {}
        self.armed_changed = False
        self.timers_saved: tuple[Cursor, float] = (START, 0.0)  # the snapshot's cursor and when it was saved
        self.timers_version = 0
        self.cursor: Cursor = START
        self.wake = asyncio.Event()
        self.throttled = False
        self.holds = HoldWatch(config.held_back_warn_s)
        self.timer_wake = asyncio.Event()
        self.timer_failures = 0  # firings failed in a row for a reason that may pass (the retry delay)
        self.routed = 0
        self.started_at = time.time()
        self.ready = asyncio.Event()
        self.listener: Listener | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()  # deliveries, restarts, reloads: kept until done
        self._flushing = asyncio.Lock()
        self._rebuilding = asyncio.Lock()
        self.draining = False
        self._main = asyncio.get_running_loop().create_task(self._run())

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        self.store = await self._until_done("connect to the event store", self._connect)
        self.llm = self._start_llm()
        # A failed restore (the store went away, a bug) is tried again: an orchestrator that gave up here would
        # stay alive and never answer, since ``status``/``register``/``wait_routed`` all wait for ``ready``.
        await self._until_done("restore routing state", self._restore)
        self.listener = Listener(self.config.database_url.get_secret_value(), self.wake)
        await self.listener.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._supervise()), loop.create_task(self._fire_timers())]
        self.ready.set()
        await self._route_forever()

    async def _until_done(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        delay = 0.5
        while True:
            try:
                return await step()
            except StoreUnavailable as e:
                log.warning("orchestrator waiting for the event store", step=what, error=str(e))
            except Exception:
                log.exception("orchestrator start step failed; trying again", step=what)
            await asyncio.sleep(delay)
            delay = min(delay * 2, START_RETRY_MAX_S)

    async def _connect(self) -> EventLog:
        return await EventLog.connect(
            self.config.database_url.get_secret_value(), max_size=6, max_event_bytes=self.config.max_event_bytes
        )

    def _named(self, cls: Any, name: str) -> Any:
        """Options for an actor this orchestrator starts: named, found again if it exists, and detached. An actor
        Ray counts as ours would die with us: an orchestrator that crashed took every agent runner, the projector
        and the team with it, and its restart had to start them all again (tens of processes at once on a small
        machine). Detached, they run on; the restarted orchestrator finds them by name and redelivers from their
        checkpoints. Stopping an agent kills its runner explicitly (``_kill``)."""
        return cls.options(name=name, namespace=self.ns, get_if_exists=True, lifetime="detached")

    def _start_llm(self) -> Any:
        return self._named(LLMActor, "llm").remote(self.config)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        """Stop the loops and close connections (tests; in the cluster Ray ends the process)."""
        for sub in self.subs.values():
            if sub.pump_later is not None:
                sub.pump_later.cancel()
        tasks = [self._main, *self._tasks, *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.listener is not None:
            await self.listener.close()
        if hasattr(self, "store"):
            await self.store.close()

    async def drain(self, timeout: float) -> dict[str, int]:
        """The first half of a stop (``agenthub down``): read nothing more, start no delivery, restart nothing and
        fire no timer; wait up to ``timeout`` for the deliveries under way; then save every subscriber's cursor and
        the timers. Killed after this, the next start redelivers only what was unfinished, not up to a second of
        handled events (the periodic flush's lag). Returns the deliveries still in flight, by subscriber."""
        self.draining = True
        loops = [self._main, *self._tasks]
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        busy = [asyncio.ensure_future(sub.idle.wait()) for sub in self.subs.values() if sub.in_flight]
        if busy:
            _, late = await asyncio.wait(busy, timeout=timeout)
            for waiter in late:
                waiter.cancel()
        await self._flush_cursors()
        await self._save_timers()
        unfinished = {name: sub.in_flight for name, sub in self.subs.items() if sub.in_flight}
        log.info("orchestrator drained", subscribers=len(self.subs), unfinished=unfinished)
        return unfinished

    async def _restore(self) -> None:
        """Rebuild routing state from the log: running agents, pending timers, subscriber checkpoints. Starts
        from nothing, so a try that failed half-way can simply run again (the actors' names are reused)."""
        self.subs, self.pending, self.timers, self.armed, self.registrations = {}, {}, [], {}, {}
        self.cursor = (await self.store.head_cursor()).cursor
        running: dict[str, RecordedEvent] = {}
        ever: set[str] = set()
        for e in await self._read_types(LIFECYCLE):
            if e.type == "agent.started":
                running[e.stream_id] = e
                ever.add(e.stream_id)
            elif e.type in ("agent.stopped", "agent.deleted", "agent.failed"):
                running.pop(e.stream_id, None)
        outlived = existing_actors({runner_name(a) for a in ever}, self.ns)  # detached runners run on
        for agent_id, started in running.items():
            await self._add_agent(agent_id, started)
            if runner_name(agent_id) in outlived:  # it may have missed an update meanwhile; a new one folds it
                self._reload_config(self.subs[runner_name(agent_id)])
        for name, handle in outlived.items():  # agents stopped or deleted while no orchestrator acted on it
            if name not in self.subs:
                log.info("stopping the runner of an agent no longer running", subscriber=name)
                self._kill(handle)
        projector = await self._add_sub(Subscription.model_validate(SUBSCRIPTION), self._projector_factory)
        projector.linger_s = PROJECTOR_LINGER_S
        latest: dict[str, dict[str, Any]] = {}  # the last registration of each name is the one routed
        for e in await self._read_types(("subscriber.registered",)):
            latest[str(e.data.get("subscription", {}).get("name"))] = e.data
        for data in latest.values():
            await self._add_registered(data)
        await self._restore_timers()

    async def _restore_timers(self) -> None:
        """The timers of the last snapshot, then the timer events after its cursor, in commit order, up to what is
        visible now (what comes later the reader acts on: its cursor is the head taken before). Replaying events
        the state already holds changes nothing: each timer ends as its last event says. Without a snapshot (a log
        written before them) every timer event is read, once."""
        snapshot = await self.store.load_snapshot(TIMERS_SNAPSHOT)
        if snapshot is None:
            for e in await self._read_types(TIMER_TYPES):
                self._track_timer(e)
            return
        self.timers_version, state = snapshot
        for data in state["armed"]:
            self._track_timer(RecordedEvent.model_validate(data))
        saved: Cursor = (int(state["cursor"][0]), int(state["cursor"][1]))
        self.timers_saved = (saved, time.monotonic())
        async for batch in self.store.committed_pages(saved, types=TIMER_TYPES):
            for e in batch:
                self._track_timer(e)

    async def _save_timers(self) -> None:
        """Snapshot the armed timers with the cursor they are current to, when they changed (at most once per
        flush), or when only the cursor moved, every ``TIMERS_SNAPSHOT_IDLE_S``."""
        cursor, saved_at = self.timers_saved
        if self.cursor == cursor or not (self.armed_changed or time.monotonic() - saved_at > TIMERS_SNAPSHOT_IDLE_S):
            return
        current = self.cursor
        state = {"cursor": list(current), "armed": [e.model_dump(mode="json") for e in self.armed.values()]}
        self.armed_changed = False  # before the await: a change while it is saved is saved next time
        self.timers_version += 1
        try:
            await self.store.save_snapshot(TIMERS_SNAPSHOT, self.timers_version, state)
        except Exception as e:  # routing goes on; the next flush tries again, a restart reads a longer suffix
            self.armed_changed = True
            log.warning("timers snapshot not saved", error=repr(e))
            return
        self.timers_saved = (current, time.monotonic())

    async def _read_types(self, types: tuple[str, ...]) -> list[RecordedEvent]:
        out: list[RecordedEvent] = []
        pos = 0
        while batch := await self.store.read_all(pos, types=types, limit=5000):
            out.extend(batch)
            pos = batch[-1].position
        return out

    def _projector_factory(self) -> Any:
        return self._named(Projector, PROJECTOR).remote(self.config)

    def _runner_factory(self, agent_id: str) -> Callable[[], Any]:
        name = runner_name(agent_id)

        def factory() -> Any:
            return self._named(AgentRunner, name).remote(self.config, agent_id)

        return factory

    @staticmethod
    def _kill(handle: Any) -> None:
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)

    def _current(self, sub: Sub) -> bool:
        return self.subs.get(sub.subscription.name) is sub

    async def _add_sub(
        self,
        subscription: Subscription,
        factory: Callable[[], Any],
        start: Cursor = START,
        agent_id: str | None = None,
        max_in_flight: int = 1,
    ) -> Sub:
        sub = Sub(subscription, factory, agent_id=agent_id, max_in_flight=max_in_flight)
        if agent_id is not None:
            sub.max_stalled = RUNNER_MAX_STALLED
        sub.idle.set()
        stored = await self.store.load_checkpoint(subscription.name)
        if stored == START and start != START:
            # Saved at once, not at the first flush after a delivery: a restart before that, or a stop and a start
            # again, resumes here (a message being answered at the stop is delivered again), not at the log's
            # beginning or at the next start event.
            await self.store.save_checkpoint(subscription.name, start)
            stored = start
        sub.handle = factory()
        sub.cursor = sub.queued = sub.persisted = sub.sent_end = stored
        self.subs[subscription.name] = sub
        self.wake.set()
        return sub

    async def _add_agent(self, agent_id: str, started: RecordedEvent) -> None:
        if runner_name(agent_id) in self.subs:
            return
        # A new agent's messages all come after its start event: begin there, not at the start of the log.
        before = (started.tx_id, started.position - 1) if started.tx_id else START
        factory = self._runner_factory(agent_id)
        await self._add_sub(runner_subscription(agent_id), factory, before, agent_id, RUNNER_IN_FLIGHT)

    async def _remove_sub(self, name: str) -> None:
        sub = self.subs.pop(name, None)
        if sub is not None:
            sub.dead = True  # its deliveries in flight end here
            self._kill(sub.handle)

    # ---- routing -----------------------------------------------------------------------------------

    async def _route_forever(self) -> None:
        last_flush = time.monotonic()
        held = 0  # reads in a row that found commits held back and nothing to route
        while True:
            self.wake.clear()
            try:
                batch = await self._route_once()
                if time.monotonic() - last_flush > 1.0:
                    await self._flush_cursors()
                    await self._save_timers()
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
            held_back = self.holds.hold is not None  # as the last read found it
            held = held + 1 if held_back and not batch else 0
            if len(batch) < BATCH or any(s.dead for s in list(self.subs.values())):
                poll = self.config.poll_interval_s
                wait = held_back_wait(held, poll) if held_back else poll
                await wait_at_most(self.wake, wait)

    async def _route_once(self) -> list[RecordedEvent]:
        live = [s for s in list(self.subs.values()) if s.active]
        # A subscriber with a full backlog (a slow one, or one whose deliveries keep failing) is read for again
        # once it has room; the others, and the orchestrator's own events, are not held up meanwhile.
        room = [s for s in live if len(s.pending) < MAX_PENDING]
        self.throttled = len(room) < len(live)  # a delivery that ends wakes the reader, to read for it again
        low = min([self.cursor, *(s.queued for s in room)])
        batch, _, held_by = await self.store.read_committed(low, BATCH)
        await self.holds.seen(held_by, self.store.describe_transaction)
        if batch:
            await self._own(batch)
            for sub in list(self.subs.values()):
                self._enqueue(sub, batch, low)
        return batch

    async def _own(self, batch: list[RecordedEvent]) -> None:
        """The orchestrator's own subscription: agent lifecycle and timers. Each event moves ``self.cursor``
        once acted on, so a batch that fails half-way (the store went away) is not acted on twice."""
        for e in batch:
            if e.cursor <= self.cursor:
                continue
            if e.type == "agent.started":
                await self._add_agent(e.stream_id, e)
            elif e.type in ("agent.stopped", "agent.deleted"):
                await self._remove_sub(runner_name(e.stream_id))
            elif e.type == "agent.updated":
                sub = self.subs.get(runner_name(e.stream_id))
                if sub is not None and sub.dead:
                    sub.reload_when_up = True
                elif sub is not None:
                    # Messages after the update should meet the new config: wait a little for it, but never let
                    # a runner that cannot reload hold up the reader (it keeps trying in the background).
                    await asyncio.wait({self._reload_config(sub)}, timeout=RELOAD_WAIT_S)
            elif e.type in TIMER_TYPES:
                self._track_timer(e)
            self.cursor = e.cursor
        self.cursor = max(self.cursor, batch[-1].cursor)

    def _reload_config(self, sub: Sub) -> asyncio.Future[None]:
        """Have ``sub``'s runner refold its config; the future is done after the first try (whatever its outcome:
        a failed one is tried again in the background)."""
        tried = asyncio.get_running_loop().create_future()
        sub.reload_waiters.append(tried)
        if sub.reloading is None or sub.reloading.done():
            sub.reloading = self._spawn(self._reload_loop(sub))
        return tried

    async def _reload_loop(self, sub: Sub) -> None:
        """Ask the runner to refold its config until it has, once more for each update that came meanwhile.
        A runner restarted meanwhile is asked too: it folded its config as it started, maybe before the update
        committed; one dead now is asked once it is up (``reload_when_up``). Failures other than a database outage
        (waited out, not counted) restart the runner after ``RELOAD_ATTEMPTS``."""
        handle, failures, tries = sub.handle, 0, 0  # tries: failed in a row, outages included (the backoff)
        try:
            while sub.reload_waiters or tries:
                if not self._current(sub):
                    return
                if sub.dead:
                    sub.reload_when_up = True
                    return
                if sub.handle is not handle:
                    handle, failures = sub.handle, 0
                waiters, sub.reload_waiters = sub.reload_waiters, []
                try:
                    await asyncio.wait_for(handle.ping.remote(), 30)  # its start is done (or was tried again)
                    await asyncio.wait_for(handle.reload_config.remote(), 30)
                    failures = tries = 0
                except Exception as e:
                    tries += 1
                    if not isinstance(e, StoreUnavailable):
                        failures += 1
                    if failures >= RELOAD_ATTEMPTS:
                        # It would answer with the old config for good: a new runner folds the new one as it starts.
                        log.error("runner did not reload its config; restarting it", subscriber=sub.subscription.name)
                        if sub.handle is handle and not sub.dead and self._current(sub):
                            self._schedule_restart(sub, f"config reload failed {failures} times: {type(e).__name__}")
                        return
                    log.warning("runner reload failed, will retry", subscriber=sub.subscription.name, error=repr(e))
                finally:
                    for w in waiters:
                        if not w.done():
                            w.set_result(None)
                if tries:
                    await asyncio.sleep(_backoff(min(tries, RELOAD_ATTEMPTS)))
        finally:
            for w in sub.reload_waiters:
                if not w.done():
                    w.set_result(None)

    def _enqueue(self, sub: Sub, batch: list[RecordedEvent], read_after: Cursor) -> None:
        """Queue ``batch`` (read after ``read_after``) for ``sub``. A subscriber queued below that point was
        rewound, restarted or added while the batch was read, or had no room when the read began: the batch lacks
        what it needs first, so it takes nothing now and a later read starts from its cursor. One with a full
        backlog takes nothing either."""
        end = batch[-1].cursor
        if not sub.active or end <= sub.queued or sub.queued < read_after or len(sub.pending) >= MAX_PENDING:
            return
        sub.pending.extend(e for e in batch if e.cursor > sub.queued and sub.subscription.matches(e))
        sub.queued = end
        self._pump(sub)

    def _pump(self, sub: Sub) -> None:
        """Start deliveries of ``sub``'s pending events, up to its limit; with nothing left to deliver, its cursor
        moves to what was read (events it does not subscribe to need no acknowledgement)."""
        while sub.active and self._room(sub):
            if not sub.pending:
                if sub.in_flight == 0:
                    sub.cursor = max(sub.cursor, sub.queued)
                return
            if self.draining:  # a stop is under way: the next start delivers what is pending
                return
            now = time.monotonic()
            linger = sub.last_sent + sub.linger_s - now if len(sub.pending) < BATCH and not sub.awaited else 0.0
            wait = max(linger, sub.retry_at - now)
            if wait > 0:
                if sub.pump_later is None:
                    sub.pump_later = asyncio.get_running_loop().call_later(wait, self._pump_now, sub)
                return
            sub.last_sent = now
            size = 1 if self._careful(sub) else BATCH
            events, sub.pending = sub.pending[:size], sub.pending[size:]
            end = events[-1].cursor if sub.pending else sub.queued
            sub.in_flight += 1
            sub.idle.clear()
            sub.delivering_since = sub.delivering_since or time.time()
            delivery = sub.window.sent(end)
            self._spawn(self._deliver(sub, events, delivery, sub.epoch, sub.sent_end))
            sub.sent_end = end
        if (
            sub.active
            and sub.pending
            and sub.in_flight < sub.max_stalled
            and sub.pump_later is None
            and not self._careful(sub)
        ):
            wait = sub.last_sent + STALLED_S - time.monotonic()  # look again once those out count as stalled
            sub.pump_later = asyncio.get_running_loop().call_later(max(wait, 0.0), self._pump_now, sub)

    def _room(self, sub: Sub) -> bool:
        if self._careful(sub):
            return sub.in_flight == 0
        return sub.in_flight < sub.max_in_flight or self._stalled(sub)

    @staticmethod
    def _careful(sub: Sub) -> bool:
        """An agent's runner redelivered what was in flight when it died: one event at a time until all of it is
        handled, so that if one of them kills the process again it dies with that one alone in flight
        (``lone_at_death``), and giving up answers only that one as failed (``_park_in_flight``)."""
        return sub.agent_id is not None and sub.cursor < sub.died_through

    @staticmethod
    def _stalled(sub: Sub) -> bool:
        return sub.in_flight < sub.max_stalled and time.monotonic() - sub.last_sent >= STALLED_S

    def _pump_now(self, sub: Sub) -> None:
        sub.pump_later = None
        self._pump(sub)

    def _rewind(self, sub: Sub) -> None:
        """Forget what was queued past the handled cursor: the reader reads it again."""
        sub.epoch += 1
        sub.pending = []
        sub.window.clear()
        sub.queued = sub.sent_end = sub.cursor

    async def _deliver(
        self, sub: Sub, events: list[RecordedEvent], delivery: Delivery, epoch: int, after: Cursor
    ) -> None:
        """Send ``events`` (after ``after``, up to ``delivery.end``). A runner, which holds several deliveries,
        is told ``after`` too: Ray may start an async actor's calls out of order (a large batch waits for the
        object store), and it registers each one's events only once the one before it has (``EntityActor``)."""
        args = (events, delivery.end, after) if sub.max_in_flight > 1 else (events, delivery.end)
        try:
            saved = await sub.handle.deliver.remote(*args)  # the cursor it checkpointed, if any
        except DEAD as e:
            if self._current(sub):
                sub.died_through = max(sub.died_through, delivery.end)
                sub.lone_at_death = events[0] if len(events) == 1 and sub.in_flight == 1 else None
            if epoch == sub.epoch and not sub.dead and self._current(sub):
                log.warning("subscriber died", subscriber=sub.subscription.name, error=str(e))
                self._schedule_restart(sub, f"died during delivery: {type(e).__name__}")
            return
        except Exception as e:
            if epoch == sub.epoch and not sub.dead and self._current(sub):
                self._delivery_failed(sub, e)
            return
        finally:
            sub.in_flight -= 1
            if sub.in_flight == 0:
                sub.delivering_since = None
                sub.idle.set()
            # Whatever this delivery's epoch: after a rewind the reader may have queued events again while this
            # call still held a place, and nothing else would send them (a re-read of the same range adds none).
            self._pump(sub)
            if self.throttled:
                self.wake.set()
        if epoch != sub.epoch:
            return
        handled = sub.window.finished(delivery)
        if handled is not None:
            # Only the handled cursor says the events before it are done: a later delivery may finish first while
            # an earlier one is still at work on the message that kills the process, and must not count for it.
            sub.cursor = max(sub.cursor, handled)
            sub.failures = sub.faults = 0
            if handled >= sub.died_through:
                sub.attempts = 0
                sub.lone_at_death = None
        if saved is not None:
            sub.persisted = max(sub.persisted, saved)
        self.routed += len(events)
        metrics.ROUTING_LAG.labels(sub.subscription.name).set(
            max(0.0, time.time() - events[-1].recorded_at.timestamp())
        )

    def _delivery_failed(self, sub: Sub, e: Exception) -> None:
        """Redeliver from the handled cursor after a delay that grows with each failure in a row. A store outage
        inside the actor is waited out; any other failure, again and again, restarts the actor (say, its start
        keeps failing), which in the end records ``agent.failed`` rather than retrying forever."""
        name = sub.subscription.name
        sub.failures += 1
        if not isinstance(e, StoreUnavailable):
            sub.faults += 1
        if sub.faults >= FAULTS_BEFORE_RESTART:
            log.warning("delivery keeps failing: restarting the subscriber", subscriber=name, error=str(e))
            self._schedule_restart(sub, f"{sub.faults} deliveries failed: {type(e).__name__}: {e}"[:500])
            return
        delay = _backoff(sub.failures)
        log.warning("delivery failed, will retry", subscriber=name, error=str(e), retry_in_s=delay)
        sub.retry_at = time.monotonic() + delay
        self._rewind(sub)
        self.wake.set()

    async def _flush_cursors(self) -> None:
        """Persist, in one round trip, the cursors no subscriber checkpointed itself: those of entity actors and
        of subscribers that had nothing to handle. A restart rereads at most a second's events, which entity
        actors handle idempotently."""
        async with self._flushing:  # a projection rebuild waits for a flush under way (see rebuild_projection)
            moved = {name: sub for name, sub in self.subs.items() if sub.active and sub.cursor > sub.persisted}
            if not moved:
                return
            cursors = {name: sub.cursor for name, sub in moved.items()}
            with contextlib.suppress(StoreUnavailable):
                await self.store.save_checkpoints(cursors)
                for name, sub in moved.items():
                    sub.persisted = max(sub.persisted, cursors[name])

    # ---- supervision -------------------------------------------------------------------------------

    def _schedule_restart(self, sub: Sub, reason: str) -> None:
        """Mark ``sub`` dead and restart it in the background; a restart that fails is tried again by
        ``_supervise`` each heartbeat until it succeeds or gives up (``agent.failed``)."""
        sub.dead = True
        sub.restart_reason = reason
        if not sub.restarting and not self.draining:
            sub.restarting = True
            self._spawn(self._restart_guarded(sub))

    async def _restart_guarded(self, sub: Sub) -> None:
        try:
            await self._restart(sub, sub.restart_reason or "restart")
        except Exception:
            log.exception("restart failed; supervision will try again", subscriber=sub.subscription.name)
        finally:
            sub.restarting = False

    async def _restart(self, sub: Sub, reason: str) -> None:
        name = sub.subscription.name
        if not self._current(sub):
            return
        # Read first: in a store outage this fails before anything changed, and the next try starts clean.
        checkpoint = await self.store.load_checkpoint(name)
        if not self._current(sub):  # stopped meanwhile, maybe started again: the name's runner is the new one's
            return
        self._kill(sub.handle)
        attempt = sub.attempts + 1
        if sub.agent_id is not None:
            stream = agent_stream(sub.agent_id)
            if attempt > self.config.max_restart_attempts:
                try:
                    parked = await self._park_in_flight(sub, checkpoint)
                except StoreUnavailable:
                    raise  # the give-up is tried again
                except Exception:  # whatever it is, the agent is still given up on
                    log.exception("messages in flight at the runner's deaths not answered", subscriber=name)
                    parked = 0
                if not self._current(sub):  # stopped meanwhile, maybe started again: that start is not failed
                    return
                answered = f"; {parked} message(s) in flight at its deaths answered as failed" if parked else ""
                why = f"gave up after {reason}{answered}"
                await self.store.append(stream, [NewEvent.of(AgentFailed(reason=why))])
                if self._current(sub):
                    del self.subs[name]
                return
            await self.store.append(stream, [NewEvent.of(AgentRestarted(attempt=attempt, reason=reason))])
        sub.attempts = attempt
        metrics.ACTOR_RESTARTS.labels(name).inc()
        handle = await self._new_handle(sub)
        reloaded = await self._reload_before_redelivery(sub, handle)
        if not self._current(sub):  # stopped meanwhile
            if name not in self.subs:  # and not started again: that start's runner is this same named actor
                self._kill(handle)
            return
        sub.handle = handle
        sub.cursor = sub.persisted = checkpoint
        self._rewind(sub)
        sub.failures = sub.faults = sub.ping_faults = 0
        sub.retry_at = 0.0
        if sub.pump_later is not None:  # an old retry's: it would hold back the stall timer (``_pump``)
            sub.pump_later.cancel()
            sub.pump_later = None
        sub.dead = False
        sub.restart_reason = None
        log.info("subscriber restarted", subscriber=name, attempt=sub.attempts, redeliver_from=sub.cursor[1])
        if not reloaded or sub.reload_when_up:  # it failed, or another update came meanwhile: in the background
            sub.reload_when_up = False
            self._reload_config(sub)
        self._pump(sub)
        self.wake.set()

    async def _reload_before_redelivery(self, sub: Sub, handle: Any) -> bool:
        """A new runner with an update pending (``reload_when_up``) refolds its config before anything is
        redelivered to it, as the reader waits for a live one's reload; False if that failed."""
        if not sub.reload_when_up:
            return True
        sub.reload_when_up = False
        try:
            await asyncio.wait_for(handle.reload_config.remote(), RELOAD_WAIT_S)
        except Exception as e:
            log.warning("restarted runner not reloaded yet", subscriber=sub.subscription.name, error=repr(e))
            return False
        return True

    async def _park_in_flight(self, sub: Sub, checkpoint: Cursor) -> int:
        """Before giving up on an agent's runner: answer as failed the message that killed it. One of those in
        flight at its deaths killed the process each time (out of memory, a crash in native code), and a start met
        it again, every time, its sender waiting for ever; answered, a start skips it (a chat answers a message
        once) and answers the rest, which were only waiting behind it. After a death the runner gets what was in
        flight one event at a time (``_careful``), so a later death names the message: the one alone in flight.
        Without that (it gave up at its first death, with several in flight), each chat's first message without an
        answer among those in flight is answered as failed."""
        if sub.died_through <= checkpoint:
            return 0
        if sub.lone_at_death is not None:
            return await self._fail_first_unanswered([sub.lone_at_death])
        chats: dict[str, list[RecordedEvent]] = {}
        for message in await self._in_flight_at_deaths(sub, checkpoint):
            chats.setdefault(message.stream, []).append(message)
        return sum([await self._fail_first_unanswered(messages) for messages in chats.values()])

    async def _fail_first_unanswered(self, messages: list[RecordedEvent]) -> int:
        """Answer as failed the first of ``messages`` (one chat's, in order) with no answer; 1 if one was. Appended
        at the version it was read at: a runner still finishing its answer (a kill takes a moment) wins."""
        for _ in range(MAX_CONFLICT_RETRIES):
            later = await self.store.read_stream(messages[0].stream, messages[0].version + 1)
            answered = {e.meta.causation_id for e in later}
            message = next((m for m in messages if m.id not in answered), None)
            if message is None:
                return 0
            d = message.data
            why = "the agent's runner died, every time, while this message was being handled; it was stopped"
            failed = NewEvent.of(ReplyFailed(agent_id=d["agent_id"], chat_id=d["chat_id"], error=why))
            failed.meta.causation_id = message.id
            failed.meta.correlation_id = message.meta.correlation_id or message.id
            failed.meta.actor = "orchestrator"
            try:
                await self.store.append(message.stream, [failed], later[-1].version if later else messages[0].version)
                return 1
            except WrongExpectedVersion:
                continue  # written meanwhile: look again
        return 0

    async def _in_flight_at_deaths(self, sub: Sub, checkpoint: Cursor) -> list[RecordedEvent]:
        """The subscriber's events after ``checkpoint`` up to the end of the deliveries in flight at its deaths."""
        found: list[RecordedEvent] = []
        async for page in self.store.committed_pages(checkpoint, types=sorted(sub.subscription.types or ())):
            found += [e for e in page if e.cursor <= sub.died_through and sub.subscription.matches(e)]
            if page and page[-1].cursor > sub.died_through:
                break
        return found

    async def _new_handle(self, sub: Sub) -> Any:
        """A new actor that answers a ping. The name is released asynchronously after a kill, and a new actor's
        start may fail for a while (it is tried again on each call): ask again for a while, then give up (the
        restart is tried again)."""
        last: BaseException | None = None
        for _ in range(50):
            try:
                handle = sub.factory()
                await asyncio.wait_for(handle.ping.remote(), 30)
                return handle
            except Exception as e:
                last = e
                await asyncio.sleep(0.2)
        raise RuntimeError(f"{sub.subscription.name} did not come back: {last!r}")

    async def _supervise(self) -> None:
        """Ping every subscriber each heartbeat interval; restart the ones that do not answer, and try again the
        restarts that failed. One subscriber's trouble, whatever it is, never ends this loop."""
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            with contextlib.suppress(Exception):
                await asyncio.gather(*(self._check(sub) for sub in list(self.subs.values())))

    async def _check(self, sub: Sub) -> None:
        name = sub.subscription.name
        try:
            if sub.dead:
                if not sub.restarting and sub.restart_reason is not None and self._current(sub):
                    self._schedule_restart(sub, sub.restart_reason)
                return
            handle = sub.handle
            try:
                await asyncio.wait_for(handle.ping.remote(), max(5.0, self.config.heartbeat_interval_s))
            except (*DEAD, TimeoutError, GetTimeoutError) as e:
                if not sub.dead and sub.handle is handle and self._current(sub):
                    log.warning("subscriber missed its heartbeat", subscriber=name, error=repr(e))
                    self._schedule_restart(sub, f"missed heartbeat: {type(e).__name__}")
                return
            except StoreUnavailable as e:  # its start waits for the store: a new actor would too
                log.warning("subscriber waits for the event store", subscriber=name, error=str(e))
                return
            except Exception as e:  # alive but broken (its start keeps failing, say)
                sub.ping_faults += 1
                log.warning("subscriber ping failed", subscriber=name, error=repr(e), in_a_row=sub.ping_faults)
                if sub.ping_faults >= FAULTS_BEFORE_RESTART and not sub.dead and sub.handle is handle:
                    self._schedule_restart(sub, f"{sub.ping_faults} pings failed: {type(e).__name__}: {e}"[:500])
                return
            sub.ping_faults = 0
        except Exception:
            log.exception("supervision step failed", subscriber=name)

    # ---- timers ------------------------------------------------------------------------------------

    def _track_timer(self, e: RecordedEvent) -> None:
        try:
            tid = e.data["timer_id"]
            if e.type in ("timer.fired", "timer.failed"):
                self.pending.pop(tid, None)
                self.armed_changed |= self.armed.pop(tid, None) is not None
            else:
                fire_at = datetime.fromisoformat(e.data["fire_at"]).timestamp()
                if tid not in self.armed:
                    self.armed[tid] = e
                    self.armed_changed = True
                if tid not in self.pending:
                    t = Timer(fire_at, tid, e)
                    self.pending[tid] = t
                    heapq.heappush(self.timers, t)
                    self.timer_wake.set()
        except Exception:
            SKIPPED.labels("timer").inc()
            log.exception("unreadable timer event skipped", event_id=str(e.id), type=e.type)

    async def _fire_timers(self) -> None:
        while True:
            try:
                await self._fire_next_timer()
            except Exception:  # never let one bad timer stop the others
                log.exception("timer step failed")
                await asyncio.sleep(0.5)

    async def _fire_next_timer(self) -> None:
        self.timer_wake.clear()
        while self.timers and self.pending.get(self.timers[0].timer_id) is not self.timers[0]:
            heapq.heappop(self.timers)  # done, or scheduled again under its id
        delay = (self.timers[0].fire_at - time.time()) if self.timers else 3600.0
        if delay > 0:
            await wait_at_most(self.timer_wake, delay)
            return
        t = self.timers[0]
        try:
            await self._fire(t)
        except UNFIREABLE as e:
            # It will never fire (a target stream the log refuses, a payload over the size limit): skip it, and
            # record that, so the orchestrator does not try again after every restart.
            self.pending.pop(t.timer_id, None)
            SKIPPED.labels("timer").inc()
            log.exception("timer cannot fire; recorded as failed", timer=t.timer_id)
            await self._record_timer_failure(t, e)
            return
        except Exception as e:  # the store is down or refused for now (a deadlock, a failover): fire it later
            self.timer_failures += 1
            delay = _backoff(self.timer_failures)
            log.warning("timer could not fire, will retry", timer=t.timer_id, error=repr(e), retry_in_s=delay)
            await asyncio.sleep(delay)
            return
        self.timer_failures = 0
        # Forgotten by id, not popped: while the append was awaited the reader may have pushed an earlier timer,
        # and the heap's top may be that one now. A fired timer leaves the heap when it comes to the top.
        self.pending.pop(t.timer_id, None)

    async def _fire(self, t: Timer) -> None:
        fired = NewEvent.of(
            TimerFired(timer_id=t.timer_id, scheduled_position=t.event.position, payload=t.event.data["payload"]),
            causation_id=t.event.id,
            correlation_id=t.event.meta.correlation_id or t.event.id,
            actor="orchestrator",
        )
        # the idempotency key makes a timer fire once, even if a restart fires it again
        await self.store.append(t.event.data["target_stream"], [fired], idempotency_key=f"timer:{t.timer_id}")

    async def _record_timer_failure(self, t: Timer, error: Exception) -> None:
        failed = NewEvent.of(
            TimerFailed(timer_id=t.timer_id, scheduled_position=t.event.position, error=f"{error!r}"[:1000]),
            causation_id=t.event.id,
            correlation_id=t.event.meta.correlation_id or t.event.id,
            actor="orchestrator",
        )
        try:  # the same idempotency key as the firing: a timer either fires or fails, once
            await self.store.append(t.event.stream, [failed], idempotency_key=f"timer:{t.timer_id}")
        except Exception:
            log.exception("could not record the timer's failure", timer=t.timer_id)

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
            "pending_timers": len(self.pending),
            "held_back": self.holds.report(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "subscribers": {
                n: {
                    "position": s.cursor[1],
                    "pending": len(s.pending),
                    "in_flight": s.in_flight,
                    "dead": s.dead,
                    "paused": s.paused,
                    "restarts": s.attempts,
                    "delivering_for_s": round(time.time() - s.delivering_since, 1) if s.delivering_since else None,
                }
                for n, s in self.subs.items()
            },
        }

    async def wait_routed(self, subscriber: str, target: Cursor, timeout: float = 10.0) -> bool:
        """True once ``subscriber`` has handled everything up to the commit-order cursor ``target`` within
        ``timeout`` (read-your-writes: ``EventLog.last_cursor`` before the call makes it everything committed)."""
        await self.ready.wait()
        deadline = time.monotonic() + timeout
        waited = self.subs.get(subscriber)
        if waited is not None:
            waited.awaited += 1
            if waited.pump_later is not None:  # its linger would hold the reader up: deliver what is read now
                waited.pump_later.cancel()
                self._pump_now(waited)
        try:
            while time.monotonic() < deadline:
                sub = self.subs.get(subscriber)
                if sub is not None and sub.cursor >= target and sub.active:
                    return True
                await asyncio.sleep(0.01)
            return False
        finally:
            if waited is not None:
                waited.awaited -= 1

    async def register(self, subscription: Subscription, actor: str, args: list[Any] | None = None) -> None:
        """Route ``subscription`` to a Ray actor ``actor`` (``module:Class`` of a ``ray.remote`` class, built as
        ``Class(runtime_config, *args)``). Recorded in the log, so it survives orchestrator restarts; the last
        registration of a name is the one routed. The same registration again changes nothing; another one
        takes over (the name's actor is restarted with it, from the name's checkpoint). A class that does not
        import is refused (``ValueError``) before anything is recorded, and so is the name of a system actor
        (the projector, ``llm``, ``orchestrator``) or one an agent's runner may take (``agent:``...), running or
        not: routed, the name's actor would be that one (Ray names are unique), and a restart would kill it."""
        await self.ready.wait()
        name = subscription.name
        reg = SubscriberRegistered(subscription=subscription.model_dump(mode="json"), actor=actor, args=args or [])
        data = reg.model_dump(mode="json")
        async with self._registering:  # two calls for one name must not both record it
            known = self.registrations.get(name)
            if known is not None and _same_routing(known, data):
                return
            if known is None and (name in self.subs or _reserved(name)):
                raise ValueError(f"{name!r} is a system actor's name: register under another name")
            try:
                actor_class(actor)
            except Exception as e:
                raise ValueError(f"cannot route {name!r} to {actor!r}: {e!r}") from None
            await self.store.append("system-subscribers", [NewEvent.of(reg, actor="orchestrator")])
            await self._add_registered(data)

    async def _add_registered(self, data: dict[str, Any]) -> None:
        """Route a recorded registration, in place of the name's earlier one if any. One that cannot be routed
        (its class no longer imports) is logged, counted and skipped: it must not stop the orchestrator from
        starting, now or after any restart."""
        try:
            reg = SubscriberRegistered.model_validate(data)
            subscription = Subscription.model_validate(reg.subscription)
            if _reserved(subscription.name):  # recorded before register() refused such names
                raise ValueError(f"{subscription.name!r} is a system actor's name")
            cls = actor_class(reg.actor)
        except Exception:
            SKIPPED.labels("registration").inc()
            log.exception("registered subscriber skipped: it cannot be routed", registration=data)
            return
        self.registrations[subscription.name] = data

        def factory() -> Any:
            return self._named(cls, subscription.name).remote(self.config, *reg.args)

        sub = self.subs.get(subscription.name)
        if sub is None:
            await self._add_sub(subscription, factory)
            return
        sub.subscription, sub.factory = subscription, factory  # the restart rewinds: what it reads is matched anew
        self._schedule_restart(sub, "registration changed")

    async def rebuild_projection(self) -> int:
        """Empty the hub's read models and replay the whole log into them; returns events projected."""
        await self.ready.wait()
        sub = self.subs[PROJECTOR]
        async with self._rebuilding:
            async with self._flushing:  # a flush under way must not write the old cursor after the rebuild
                sub.paused = True  # no deliveries, no cursor flushes, while the tables are emptied
            try:
                await sub.idle.wait()
                await sub.handle.rebuild.remote()
                sub.cursor = sub.persisted = START
                self._rewind(sub)
            finally:  # the rebuild may fail: deliveries go on either way
                sub.paused = False
                self._pump(sub)
                self.wake.set()
        await self.wait_routed(PROJECTOR, await self.store.last_cursor(), timeout=300)
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
        """Alive and ready; ``held_back``: an open transaction holding every delivery back (actors/held_back.py)."""
        return {"ready": self.ready.is_set(), "subscribers": len(self.subs), "held_back": self.holds.report()}


Orchestrator = ray.remote(num_cpus=0, max_restarts=-1)(OrchestratorImpl)

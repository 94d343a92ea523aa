"""The orchestrator recovering from faults, driven for real (its reader, supervision and timer loops against a real
Postgres) with in-process stand-ins for the Ray actors it routes to: no Ray here."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import ray
from prometheus_client import REGISTRY
from ray.exceptions import ActorDiedError
from structlog.testing import capture_logs

from actors import orchestrator
from actors.agents.runner import runner_name
from actors.config import RuntimeConfig
from actors.orchestrator import SKIPPED, OrchestratorImpl
from actors.projections import PROJECTOR
from events import NewEvent, RecordedEvent, Subscription
from events.hub import AgentStarted, AgentStopped, AgentUpdated, MessageReceived
from events.system import SubscriberRegistered, TimerScheduled
from storage.errors import StoreUnavailable
from storage.eventlog import EventLog
from tests.conftest import eventually, free_port

HERE = __name__  # "tests.test_orchestrator_recovery": registrations name classes of this module


# ---- stand-ins for Ray actors -------------------------------------------------------------------------


class Recorder:
    """A subscriber that works: records what it is sent."""

    def __init__(self) -> None:
        self.seen: list[RecordedEvent] = []
        self.pings = 0
        self.reloads = 0
        self.killed = False
        self.sent: list[tuple[Any, Any]] = []  # (after, end) of each delivery

    async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
        self.seen.extend(events)
        self.sent.append((after, cursor))

    async def ping(self) -> dict[str, Any]:
        self.pings += 1
        return {"projected": len(self.seen)}

    async def reload_config(self) -> None:
        self.reloads += 1

    async def rebuild(self) -> None:
        self.seen.clear()

    def metrics(self) -> bytes:
        return b""


class FailsFirst(Recorder):
    """Its first delivery awaits ``before_failing``, then fails; the later ones are recorded."""

    def __init__(self, before_failing: Callable[[], Awaitable[Any]]) -> None:
        super().__init__()
        self.before_failing = before_failing
        self.calls = 0

    async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
        self.calls += 1
        if self.calls == 1:
            await self.before_failing()
            raise RuntimeError("store blip inside the actor")
        await super().deliver(events, cursor)


class _Remote:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        async def call() -> Any:
            r = self.fn(*args)
            return await r if inspect.isawaitable(r) else r

        return asyncio.ensure_future(call())  # started at once, like a Ray call


class Handle:
    """Looks like a Ray actor handle: ``handle.method.remote(...)`` runs ``impl.method`` and is awaitable."""

    def __init__(self, impl: Any) -> None:
        self.impl = impl

    def __getattr__(self, name: str) -> _Remote:
        return _Remote(getattr(self.impl, name))


class Actors:
    """Named actors as Ray keeps them: ``get_if_exists`` returns the live one, a killed one is replaced. What a
    new instance is can be set per name (``make[name] = lambda nth: ...``, ``nth`` from 0)."""

    def __init__(self) -> None:
        self.make: dict[str, Callable[[int], Any]] = {}
        self.instances: defaultdict[str, list[Any]] = defaultdict(list)

    def get(self, name: str) -> Handle:
        live = self.instances[name]
        if not live or live[-1].killed:
            impl = self.make.get(name, lambda _: Recorder())(len(live))
            impl.killed = False
            live.append(impl)
        return Handle(live[-1])

    def seen(self, name: str) -> list[RecordedEvent]:
        return [e for impl in self.instances[name] for e in getattr(impl, "seen", [])]


ACTORS = Actors()


class FakeActorClass:
    """Stands in for a ``ray.remote`` class: ``Cls.options(name=...).remote(config, *args)``."""

    def options(self, *, name: str, **_: Any) -> Any:
        class Builder:
            def remote(self, config: RuntimeConfig, *args: Any) -> Handle:
                return ACTORS.get(name)

        return Builder()


Fake = FakeActorClass()


@pytest.fixture
def actors(monkeypatch: pytest.MonkeyPatch) -> Actors:
    global ACTORS
    ACTORS = Actors()

    def kill(handle: Handle, no_restart: bool = True) -> None:
        handle.impl.killed = True

    monkeypatch.setattr(ray, "kill", kill)  # never start Ray from a unit test
    monkeypatch.setattr(orchestrator, "Projector", Fake)
    monkeypatch.setattr(orchestrator, "AgentRunner", Fake)
    monkeypatch.setattr(orchestrator, "LLMActor", Fake)
    monkeypatch.setattr(orchestrator, "RETRY_S", 0.02, raising=False)  # retries in tenths of a second, not seconds
    return ACTORS


Start = Callable[..., Awaitable[OrchestratorImpl]]


@pytest.fixture
async def start(db_url: str, actors: Actors) -> AsyncIterator[Start]:
    started: list[OrchestratorImpl] = []

    async def go(**settings: Any) -> OrchestratorImpl:
        config = RuntimeConfig(database_url=db_url, heartbeat_interval_s=0.2, poll_interval_s=0.2, **settings)
        o = OrchestratorImpl(config)
        started.append(o)
        await asyncio.wait_for(o.ready.wait(), 15)
        return o

    yield go
    for o in started:
        if hasattr(o, "close"):
            await o.close()
            continue
        for task in [o._main, *getattr(o, "_tasks", [])]:
            task.cancel()
        await asyncio.gather(o._main, *getattr(o, "_tasks", []), return_exceptions=True)
        if getattr(o, "listener", None) is not None:
            await o.listener.close()
        if hasattr(o, "store"):
            await o.store.close()


async def route(o: OrchestratorImpl, name: str, *categories: str) -> None:
    await o.register(Subscription(name=name, categories=frozenset(categories)), f"{HERE}:Fake")


async def put(log: EventLog, stream: str, n: int = 1) -> list[int]:
    res = await log.append(stream, [NewEvent.of(AgentStopped(reason=f"{stream} {i}")) for i in range(n)])
    return res.positions


def positions(actors: Actors, name: str) -> list[int]:
    return sorted({e.position for e in actors.seen(name)})


async def delivered_to(actors: Actors, name: str, wanted: list[int], *, timeout: float, what: str) -> None:
    """Wait until subscriber ``name`` has received exactly the events at ``wanted``."""

    async def delivered() -> bool:
        return positions(actors, name) == wanted

    await eventually(delivered, timeout=timeout, what=what)


# ---- 1. a failed delivery never strands what was read meanwhile ------------------------------------------


async def test_events_read_again_during_a_failed_deliverys_retry_are_sent(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    """A delivery fails; while its retry waits, an unrelated commit makes the reader read the same range again.
    Those events must still go out, without waiting for yet another append."""

    later: list[asyncio.Future[None]] = []

    async def unrelated_commit() -> None:
        await asyncio.sleep(0.05)  # lands while the failed delivery's retry waits
        await put(eventlog, "other-x")

    async def then_commit() -> None:
        later.append(asyncio.ensure_future(unrelated_commit()))

    actors.make["s"] = lambda _: FailsFirst(then_commit)
    o = await start()
    await route(o, "s", "work")
    wanted = await put(eventlog, "work-1", 2)

    await delivered_to(actors, "s", wanted, timeout=5, what="both events delivered after the failed delivery")
    assert o.subs["s"].pending == [] and o.subs["s"].in_flight == 0


async def test_a_delivery_that_fails_while_the_reader_reads_past_it_is_sent_again(
    start: Start, actors: Actors, eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader reads from the lowest queued cursor, which is past the events of a delivery in flight. If that
    delivery fails while the read is under way, its subscriber is rewound below where the read began: the batch
    read must not be queued for it as if it followed on (the failed events would be skipped for good, and its
    cursor would pass them)."""
    fail = asyncio.Event()
    actors.make["s"] = lambda _: FailsFirst(fail.wait)
    o = await start()
    await route(o, "s", "work")
    first = await put(eventlog, "work-1", 3)

    async def in_flight() -> bool:
        return o.subs["s"].in_flight == 1

    await eventually(in_flight, timeout=5, what="the first delivery under way")
    reading, release = asyncio.Event(), asyncio.Event()
    read = o.store.read_committed

    async def held(*args: Any, **kwargs: Any) -> Any:
        reading.set()
        await release.wait()
        return await read(*args, **kwargs)

    monkeypatch.setattr(o.store, "read_committed", held)
    later = await put(eventlog, "work-2", 2)
    await asyncio.wait_for(reading.wait(), 5)  # the reader reads from past the first three
    fail.set()

    async def failed() -> bool:
        return o.subs["s"].in_flight == 0

    await eventually(failed, timeout=5, what="the first delivery failed and rewound")
    release.set()
    await delivered_to(actors, "s", first + later, timeout=5, what="the failed events sent again with the later ones")
    assert o.subs["s"].cursor >= (await eventlog.read_all(later[-1] - 1, limit=1))[0].cursor


async def test_a_subscriber_with_a_full_backlog_holds_up_no_other_and_gets_everything_later(
    start: Start, actors: Actors, eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One subscriber stuck on a delivery (a slow projection, one whose deliveries keep failing) used to stop the
    reader for everyone once its backlog was full: every agent's replies stalled behind it."""
    monkeypatch.setattr(orchestrator, "MAX_PENDING", 5)
    unblock = asyncio.Event()

    class Stuck(Recorder):
        async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
            await unblock.wait()
            await super().deliver(events, cursor)

    actors.make["stuck"] = lambda _: Stuck()
    o = await start()
    await route(o, "stuck", "work")
    await route(o, "s", "work")
    wanted = await put(eventlog, "work-1", 3)

    async def stuck_in_flight() -> bool:
        return o.subs["stuck"].in_flight == 1

    await eventually(stuck_in_flight, timeout=5, what="the stuck subscriber's first delivery under way")
    wanted += await put(eventlog, "work-2", 10)  # its backlog is full now

    async def full() -> bool:
        return len(o.subs["stuck"].pending) >= 5

    await eventually(full, timeout=5, what="the stuck subscriber's backlog full")
    for i in range(3):
        wanted += await put(eventlog, f"work-later{i}")
    await delivered_to(actors, "s", wanted, timeout=5, what="the other subscriber served meanwhile")
    assert positions(actors, "stuck") == []
    unblock.set()
    await delivered_to(actors, "stuck", wanted, timeout=10, what="the stuck one gets everything, read again for it")


# ---- 2, 3. timers -------------------------------------------------------------------------------------


def timer(tid: str, fire_at: datetime, target: str | None = None) -> NewEvent:
    return NewEvent.of(TimerScheduled(timer_id=tid, fire_at=fire_at, target_stream=target or f"reminder-{tid}"))


async def fired_in(log: EventLog, stream: str) -> list[str]:
    return [e.type for e in await log.read_stream(stream)]


async def test_an_earlier_timer_scheduled_while_one_fires_fires_too(start: Start, eventlog: EventLog) -> None:
    o = await start()
    now = datetime.now(UTC)
    real_append = o.store.append
    held = asyncio.Event()

    async def append(stream: str, events: Any, *args: Any, **kwargs: Any) -> Any:
        if stream == "reminder-a" and not held.is_set():
            held.set()  # while timer a's firing is being appended, the reader tracks an earlier, overdue timer b
            await eventlog.append("timer-b", [timer("b", now - timedelta(seconds=10))])

            async def b_tracked() -> bool:
                return any(t.timer_id == "b" for t in o.timers)

            await eventually(b_tracked, timeout=5, what="timer b tracked")
        return await real_append(stream, events, *args, **kwargs)

    o.store.append = append  # type: ignore[method-assign]
    await eventlog.append("timer-a", [timer("a", now - timedelta(seconds=1))])

    async def both_fired() -> bool:
        return await fired_in(eventlog, "reminder-a") == ["timer.fired"] and await fired_in(eventlog, "reminder-b") == [
            "timer.fired"
        ]

    await eventually(both_fired, timeout=5, what="timers a and b fired")
    assert (await o.status())["pending_timers"] == 0


async def test_a_fired_timer_leaves_no_state_behind_also_after_a_restart(start: Start, eventlog: EventLog) -> None:
    """The orchestrator once kept every fired timer's id for as long as it ran (a CEO loop ticks on timers): now
    a timer that is done leaves nothing behind, and a restart, which reads every timer event again, neither
    keeps nor fires any of them."""
    o = await start()
    now = datetime.now(UTC)
    for i in range(20):
        await eventlog.append(f"timer-t{i}", [timer(f"t{i}", now - timedelta(seconds=1))])

    async def all_fired() -> bool:
        return all([await fired_in(eventlog, f"reminder-t{i}") == ["timer.fired"] for i in range(20)])

    await eventually(all_fired, timeout=10, what="20 timers fired")

    async def forgotten() -> bool:
        return not o.pending and not o.timers

    await eventually(forgotten, timeout=5, what="no state left for fired timers")
    again = await start()
    assert not again.pending and not again.timers and (await again.status())["pending_timers"] == 0
    await asyncio.sleep(0.3)  # a timer loop that fired anything again would have by now
    assert all([await fired_in(eventlog, f"reminder-t{i}") == ["timer.fired"] for i in range(20)])


async def saved_timers(log: EventLog) -> tuple[Any, set[str]]:
    snapshot = await log.load_snapshot(orchestrator.TIMERS_SNAPSHOT)
    if snapshot is None:
        return None, set()
    return tuple(snapshot[1]["cursor"]), {e["data"]["timer_id"] for e in snapshot[1]["armed"]}


async def test_a_restart_reads_the_timers_snapshot_and_the_timer_events_after_it(
    start: Start, eventlog: EventLog
) -> None:
    """A restart once read every timer event ever written. Now the orchestrator snapshots the armed timers with
    the cursor they are current to, and a restart reads that and the timer events after it."""
    now = datetime.now(UTC)
    o = await start()
    await eventlog.append("timer-later", [timer("later", now + timedelta(hours=1))])
    await eventlog.append("timer-soon", [timer("soon", now - timedelta(seconds=1))])
    await put(eventlog, "agent-unrelated")  # the snapshot's cursor moves past events of other types too
    head = (await eventlog.head_cursor()).cursor

    async def snapshotted() -> bool:
        cursor, armed = await saved_timers(eventlog)
        return cursor is not None and cursor >= head and armed == {"later"}  # "soon" fired: not armed

    await eventually(snapshotted, timeout=10, what="a snapshot with the armed timer")
    snapshot_cursor, _ = await saved_timers(eventlog)
    assert await fired_in(eventlog, "reminder-soon") == ["timer.fired"]
    await o.close()

    # After the snapshot: one more timer, and the firing of one the snapshot holds.
    await eventlog.append("timer-next", [timer("next", now + timedelta(hours=2))])
    again = await start()
    assert set(again.pending) == {"later", "next"} and set(again.armed) == {"later", "next"}

    async def snapshotted_again() -> bool:  # the restarted orchestrator brings the snapshot up to date
        return (await saved_timers(eventlog))[1] == {"later", "next"}

    await eventually(snapshotted_again, timeout=10, what="the snapshot refreshed after the restart")
    await again.close()

    # The snapshot is what a restart believes: one that says nothing is armed (as of the same cursor) leaves only
    # the timer scheduled after it; the events before its cursor are not read again.
    trust = {"cursor": list(snapshot_cursor), "armed": []}
    await eventlog.save_snapshot(orchestrator.TIMERS_SNAPSHOT, 10**6, trust)
    trusting = await start()
    assert set(trusting.pending) == {"next"}
    await trusting.close()

    # Without a snapshot (a log from before them), every timer event is read.
    await eventlog.execute("DELETE FROM snapshots WHERE stream = $1", orchestrator.TIMERS_SNAPSHOT)
    fresh = await start()
    assert set(fresh.pending) == {"later", "next"}
    assert await fired_in(eventlog, "reminder-soon") == ["timer.fired"]  # never fired twice


async def test_a_timers_snapshot_that_cannot_be_saved_holds_nothing_up(
    start: Start, eventlog: EventLog, actors: Actors, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot is an optimisation of the next start: failing to save it is logged and tried again at the
    next flush; routing and timers go on undisturbed (a routing step that failed would pause the reader)."""
    o = await start()
    failed: list[int] = []

    async def refuse(*_: Any) -> None:
        failed.append(1)
        raise RuntimeError("snapshot refused")

    monkeypatch.setattr(o.store, "save_snapshot", refuse)
    await route(o, "s1", "agent")
    now = datetime.now(UTC)
    with capture_logs() as logs:
        await eventlog.append("timer-x", [timer("x", now - timedelta(seconds=1))])

        async def tried_twice() -> bool:
            return len(failed) >= 2

        await eventually(tried_twice, timeout=5, what="a snapshot tried at two flushes")
        wanted = await put(eventlog, "agent-a", 3)
        await delivered_to(actors, "s1", wanted, timeout=5, what="events routed while snapshots fail")

        async def fired() -> bool:
            return await fired_in(eventlog, "reminder-x") == ["timer.fired"]

        await eventually(fired, timeout=5, what="the timer fired while snapshots fail")
    events = [entry["event"] for entry in logs]
    assert "timers snapshot not saved" in events and "routing step failed" not in events
    assert await saved_timers(eventlog) == (None, set())


def test_a_timer_for_an_invalid_stream_is_refused_when_scheduled() -> None:
    with pytest.raises(ValueError, match="invalid stream name"):
        TimerScheduled(timer_id="x", fire_at=datetime.now(UTC), target_stream="Not A Stream")


async def test_a_timer_that_cannot_fire_is_recorded_and_the_others_fire(start: Start, eventlog: EventLog) -> None:
    """A timer scheduled before target streams were checked (written here behind the model's back) fails when it
    fires: it is recorded as failed, the timers after it still fire, and a restart does not try it again."""
    now = datetime.now(UTC)
    await eventlog.append("timer-bad", [timer("bad", now - timedelta(seconds=2))])
    await eventlog.execute(
        "UPDATE events SET data = jsonb_set(data, '{target_stream}', '\"Not A Stream\"') WHERE stream = 'timer-bad'"
    )
    await eventlog.append("timer-good", [timer("good", now - timedelta(seconds=1))])
    o = await start()

    async def good_fired() -> bool:
        return await fired_in(eventlog, "reminder-good") == ["timer.fired"]

    await eventually(good_fired, timeout=5, what="the good timer fired")
    assert await fired_in(eventlog, "timer-bad") == ["timer.scheduled", "timer.failed"]
    assert not o._tasks[1].done()  # the timer loop lives on

    again = await start()  # a restart rebuilds timers from the log: the failed one is not pending
    status = await again.status()
    assert status["pending_timers"] == 0 and not again._tasks[1].done()
    later = now + timedelta(seconds=0.3)
    await eventlog.append("timer-next", [timer("next", later)])

    async def next_fired() -> bool:
        return await fired_in(eventlog, "reminder-next") == ["timer.fired"]

    await eventually(next_fired, timeout=5, what="a timer after the restart fired")
    assert await fired_in(eventlog, "timer-bad") == ["timer.scheduled", "timer.failed"]


async def test_an_unreadable_timer_is_skipped_and_the_others_fire(start: Start, eventlog: EventLog) -> None:
    """A timer whose time cannot be read (written behind the model's back) is logged, counted and skipped; its
    log line once raised a TypeError of its own (``event=`` is structlog's message argument)."""
    now = datetime.now(UTC)
    await eventlog.append("timer-bad", [timer("unreadable", now - timedelta(seconds=2))])
    await eventlog.execute("UPDATE events SET data = data - 'fire_at' WHERE stream = 'timer-bad'")
    await eventlog.append("timer-good", [timer("good", now - timedelta(seconds=1))])
    skipped = SKIPPED.labels("timer")._value.get()
    await start()

    async def good_fired() -> bool:
        return await fired_in(eventlog, "reminder-good") == ["timer.fired"]

    await eventually(good_fired, timeout=5, what="the good timer fired")
    assert SKIPPED.labels("timer")._value.get() == skipped + 1
    assert await fired_in(eventlog, "timer-bad") == ["timer.scheduled"]


async def test_a_timer_that_meets_a_passing_database_error_fires_later_and_is_not_failed(
    start: Start, eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadlock or a failover refuses a firing for a moment: that timer is not lost as ``timer.failed`` (its
    idempotency key would keep it from ever firing), it fires on a later try."""
    await eventlog.append("timer-dl", [timer("dl", datetime.now(UTC) + timedelta(seconds=0.5))])
    o = await start()
    append, refused = o.store.append, []

    async def deadlocked_once(stream: str, *args: Any, **kwargs: Any) -> Any:
        if stream == "reminder-dl" and not refused:
            refused.append(stream)
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        return await append(stream, *args, **kwargs)

    monkeypatch.setattr(o.store, "append", deadlocked_once)

    async def fired() -> bool:
        return await fired_in(eventlog, "reminder-dl") == ["timer.fired"]

    await eventually(fired, timeout=5, what="the timer fired after the deadlock")
    assert refused == ["reminder-dl"]
    assert await fired_in(eventlog, "timer-dl") == ["timer.scheduled"]  # no timer.failed


# ---- 4. supervision -----------------------------------------------------------------------------------


async def test_a_subscriber_whose_pings_fail_is_restarted_and_supervision_goes_on(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    class Broken(Recorder):
        async def ping(self) -> dict[str, Any]:
            raise RuntimeError("its start failed")  # what a RayTaskError from an actor's ping looks like

    actors.make["s"] = lambda nth: Broken() if nth == 0 else Recorder()
    o = await start()
    await route(o, "s", "work")
    await route(o, "t", "work")

    async def restarted() -> bool:
        return len(actors.instances["s"]) == 2 and not o.subs["s"].dead

    await eventually(restarted, timeout=10, what="the broken subscriber restarted")
    pings = actors.instances["t"][-1].pings
    await eventually(lambda: _true(actors.instances["t"][-1].pings > pings + 2), timeout=5, what="t still pinged")
    wanted = await put(eventlog, "work-1")

    async def delivered() -> bool:
        return positions(actors, "s")[-1:] == wanted and positions(actors, "t")[-1:] == wanted

    await eventually(delivered, timeout=5, what="delivered after the restart")


async def _true(value: bool) -> bool:
    """A condition computed at once, for ``eventually``."""
    return value


async def test_a_subscriber_whose_deliveries_keep_failing_is_restarted(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    class Failing(Recorder):
        async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
            raise RuntimeError("setup is broken in this process")

    actors.make["s"] = lambda nth: Failing() if nth == 0 else Recorder()
    o = await start()
    await route(o, "s", "work")
    wanted = await put(eventlog, "work-1", 3)

    await delivered_to(actors, "s", wanted, timeout=15, what="delivered by a restarted subscriber")
    assert len(actors.instances["s"]) == 2 and o.subs["s"].attempts == 0


class DiesOnPoison(Recorder):
    """A runner whose process dies on the message ``poison``, but only once a later delivery (the second one in
    flight) has finished: that one's success must not count as the poison's. Sent alone (one event at a time
    after a death), it dies after a moment."""

    def __init__(self) -> None:
        super().__init__()
        self.later_done = asyncio.Event()

    async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
        if any(e.data.get("text") == "poison" for e in events):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.later_done.wait(), 0.5)
            raise ActorDiedError()
        await super().deliver(events, cursor)
        self.later_done.set()


class DiesAtOnce(Recorder):
    """A runner whose process dies as soon as a delivery holds the message ``poison``. The texts of every delivery
    go to ``deliveries``, which the instances a restart makes share."""

    def __init__(self, deliveries: list[list[str]]) -> None:
        super().__init__()
        self.deliveries = deliveries

    async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
        self.deliveries.append([e.data["text"] for e in events])
        if any(e.data.get("text") == "poison" for e in events):
            raise ActorDiedError()
        await super().deliver(events, cursor)


async def test_a_message_that_kills_its_runner_ends_in_agent_failed_though_later_deliveries_succeed(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    actors.make["agent:x"] = lambda _: DiesOnPoison()
    o = await start(max_restart_attempts=2)
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
    await eventlog.append("chat-x/1", [NewEvent.of(MessageReceived(agent_id="x", chat_id="1", text="poison"))])

    async def chatter() -> None:  # other chats' messages, so a second delivery is always on its way
        for i in range(1000):
            await eventlog.append(
                f"chat-x/{i + 2}", [NewEvent.of(MessageReceived(agent_id="x", chat_id="2", text="hi"))]
            )
            await asyncio.sleep(0.02)

    others = asyncio.create_task(chatter())
    try:

        async def failed() -> bool:
            return any(e.type == "agent.failed" for e in await eventlog.read_stream("agent-x"))

        await eventually(failed, timeout=20, what="agent.failed after the restarts")
    finally:
        others.cancel()
    restarted = [e for e in await eventlog.read_stream("agent-x") if e.type == "agent.restarted"]
    assert [e.data["attempt"] for e in restarted] == [1, 2] and "agent:x" not in o.subs

    # The message that killed it is answered as failed (a start's runner skips it: a chat answers a message once).
    poison, *answers = await eventlog.read_stream("chat-x/1")
    assert [(a.type, a.meta.causation_id) for a in answers] == [("chat.reply_failed", poison.id)]
    assert "died" in answers[0].data["error"] and answers[0].meta.correlation_id == poison.id
    failed_event = next(e for e in await eventlog.read_stream("agent-x") if e.type == "agent.failed")
    assert "answered as failed" in failed_event.data["reason"]


async def test_giving_up_answers_only_the_first_unanswered_message_of_each_chat(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    """The later ones were waiting behind it in their chat: a start answers them."""

    actors.make["agent:x"] = lambda _: DiesAtOnce([])
    await start(max_restart_attempts=0)
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
    await eventlog.append(
        "chat-x/1",
        [NewEvent.of(MessageReceived(agent_id="x", chat_id="1", text=t)) for t in ("poison", "after it", "and more")],
    )

    async def failed() -> bool:
        return any(e.type == "agent.failed" for e in await eventlog.read_stream("agent-x"))

    await eventually(failed, timeout=20, what="agent.failed")
    poison, *rest = [e for e in await eventlog.read_stream("chat-x/1") if e.type == "chat.message_received"]
    answers = [e for e in await eventlog.read_stream("chat-x/1") if e.type == "chat.reply_failed"]
    assert [a.meta.causation_id for a in answers] == [poison.id] and len(rest) == 2


async def test_giving_up_answers_as_failed_only_the_message_that_killed_the_runner(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    """Other chats' messages in flight at its first death were answered as failed too, though they only shared a
    delivery with the one that killed it. After a death, what was in flight goes to the runner one event at a
    time, so the next death names the message."""
    deliveries: list[list[str]] = []
    actors.make["agent:x"] = lambda _: DiesAtOnce(deliveries)
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
    for chat, text in (("2", "hi"), ("3", "hello"), ("1", "poison"), ("4", "hey")):
        await eventlog.append(f"chat-x/{chat}", [NewEvent.of(MessageReceived(agent_id="x", chat_id=chat, text=text))])
    await start(max_restart_attempts=2)  # reads all four at once: one delivery, and the runner dies with it

    async def failed() -> bool:
        return any(e.type == "agent.failed" for e in await eventlog.read_stream("agent-x"))

    await eventually(failed, timeout=20, what="agent.failed after the restarts")
    assert deliveries[0] == ["hi", "hello", "poison", "hey"]
    assert ["poison"] in deliveries[1:] and all(len(d) == 1 for d in deliveries[1:])  # "hey" waits behind it
    failures = {
        chat: [
            e.meta.causation_id for e in await eventlog.read_stream(f"chat-x/{chat}") if e.type == "chat.reply_failed"
        ]
        for chat in "1234"
    }
    poison = (await eventlog.read_stream("chat-x/1"))[0]
    assert failures == {"1": [poison.id], "2": [], "3": [], "4": []}
    reason = next(e for e in await eventlog.read_stream("agent-x") if e.type == "agent.failed").data["reason"]
    assert "1 message(s) in flight at its deaths answered as failed" in reason


class DiesOnFirst(Recorder):
    """Its process dies in its first delivery."""

    async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
        raise ActorDiedError()


class StartsWhenLetGo(Recorder):
    """A new actor whose start takes until ``go`` is set: its first ping waits for it."""

    def __init__(self, go: asyncio.Event) -> None:
        super().__init__()
        self.go = go

    async def ping(self) -> dict[str, Any]:
        await self.go.wait()
        return await super().ping()


@pytest.mark.parametrize("started_again", [False, True])
async def test_a_stop_while_a_restarted_runner_starts(
    start: Start, actors: Actors, eventlog: EventLog, started_again: bool
) -> None:
    """The restart waits for the new runner to answer a ping; the agent is stopped meanwhile. Stopped for good, the
    new runner is killed (it would run on, detached, for nobody). Started again before it answered, the start's
    runner is that same named actor: it is kept, and it is the one that works."""
    go = asyncio.Event()
    actors.make["agent:x"] = lambda nth: DiesOnFirst() if nth == 0 else StartsWhenLetGo(go)
    o = await start()
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
    await eventlog.append("chat-x/1", [NewEvent.of(MessageReceived(agent_id="x", chat_id="1", text="hi"))])

    async def starting() -> bool:
        restarted = any(e.type == "agent.restarted" for e in await eventlog.read_stream("agent-x"))
        return restarted and len(actors.instances["agent:x"]) == 2

    await eventually(starting, timeout=10, what="the restart waiting for its new runner")
    await eventlog.append("agent-x", [NewEvent.of(AgentStopped(reason="stop"))])
    await eventually(lambda: _true("agent:x" not in o.subs), timeout=5, what="the stop taken")
    if started_again:
        await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
        await eventually(lambda: _true("agent:x" in o.subs), timeout=5, what="the start taken")
    go.set()
    restarting = actors.instances["agent:x"][1]
    if not started_again:
        await eventually(lambda: _true(restarting.killed), timeout=5, what="the restart's runner killed")
        assert "agent:x" not in o.subs and len(actors.instances["agent:x"]) == 2
        return
    later = await eventlog.append("chat-x/2", [NewEvent.of(MessageReceived(agent_id="x", chat_id="2", text="yo"))])

    async def answered_by_it() -> bool:
        return later.positions[0] in {e.position for e in restarting.seen}

    await eventually(answered_by_it, timeout=10, what="the started runner delivered to")
    assert not restarting.killed and o.subs["agent:x"].handle.impl is restarting
    assert len(actors.instances["agent:x"]) == 2  # no third runner was made


@pytest.mark.parametrize("started_again", [False, True])
async def test_a_stop_while_the_orchestrator_gives_up_on_a_runner(
    start: Start, actors: Actors, eventlog: EventLog, monkeypatch: pytest.MonkeyPatch, started_again: bool
) -> None:
    """Giving up first answers the message that killed the runner, then records ``agent.failed``. A stop that comes
    in between (and a start after it) is not failed: the start's runner is left to work."""
    go, parking = asyncio.Event(), asyncio.Event()
    actors.make["agent:x"] = lambda _: DiesOnFirst()
    o = await start(max_restart_attempts=0)
    append = o.store.append

    async def slow_parking(stream: str, *args: Any, **kwargs: Any) -> Any:
        if stream.startswith("chat-x/"):
            parking.set()
            await go.wait()
        return await append(stream, *args, **kwargs)

    monkeypatch.setattr(o.store, "append", slow_parking)
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
    await eventlog.append("chat-x/1", [NewEvent.of(MessageReceived(agent_id="x", chat_id="1", text="hi"))])
    await asyncio.wait_for(parking.wait(), 10)
    await eventlog.append("agent-x", [NewEvent.of(AgentStopped(reason="stop"))])
    await eventually(lambda: _true("agent:x" not in o.subs), timeout=5, what="the stop taken")
    if started_again:
        actors.make["agent:x"] = lambda _: Recorder()
        await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
        await eventually(lambda: _true("agent:x" in o.subs), timeout=5, what="the start taken")
    go.set()

    async def parked() -> bool:
        return any(e.type == "chat.reply_failed" for e in await eventlog.read_stream("chat-x/1"))

    await eventually(parked, timeout=5, what="the message that killed it answered as failed")
    await asyncio.sleep(0.3)  # what the give-up does next, it has done by now
    types = [e.type for e in await eventlog.read_stream("agent-x")]
    assert "agent.failed" not in types
    assert ("agent:x" in o.subs) is started_again
    if started_again:
        later = await eventlog.append("chat-x/2", [NewEvent.of(MessageReceived(agent_id="x", chat_id="2", text="yo"))])

        async def at_work() -> bool:  # after "hi" again: its runner skips a message answered already
            return later.positions[0] in positions(actors, "agent:x")

        await eventually(at_work, timeout=5, what="the started runner at work")


class NeverAnswers(Recorder):
    """Takes a delivery and never finishes it: a reply from a slow model, cut short by a stop."""

    async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
        self.seen.extend(events)
        await asyncio.Event().wait()


async def test_a_message_in_flight_when_its_agent_stops_is_delivered_when_it_runs_again(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    """A runner's place was not saved until its first delivery finished: the next start began at its own start
    event, and the message that was being answered at the stop was never answered."""
    actors.make["agent:x"] = lambda nth: NeverAnswers() if nth == 0 else Recorder()
    await start()
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
    await eventlog.append("chat-x/1", [NewEvent.of(MessageReceived(agent_id="x", chat_id="1", text="slow"))])

    def asked(nth: int) -> bool:
        instances = actors.instances["agent:x"]
        return len(instances) > nth and any(e.type == "chat.message_received" for e in instances[nth].seen)

    async def first_asked() -> bool:
        return asked(0)

    await eventually(first_asked, timeout=5, what="the first runner to get the message")
    await eventlog.append("agent-x", [NewEvent.of(AgentStopped(reason="by the user"))])
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])

    async def asked_again() -> bool:
        return asked(1)

    await eventually(asked_again, timeout=5, what="the runner of the next start to get the message")


async def test_a_restart_stops_the_runners_of_agents_stopped_meanwhile_and_refreshes_the_others(
    start: Start, actors: Actors, eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runners are detached: they outlive the orchestrator. A stop while no orchestrator acted on it left its
    runner running (and heartbeating) for good; an update then was never reloaded by the runner that ran on."""

    def live(names: set[str], namespace: str) -> dict[str, Handle]:
        alive = {n: actors.instances[n][-1] for n in names if actors.instances[n]}
        return {n: Handle(impl) for n, impl in alive.items() if not impl.killed}

    monkeypatch.setattr(orchestrator, "existing_actors", live)
    first = await start()
    for agent in ("stays", "goes"):
        await eventlog.append(f"agent-{agent}", [NewEvent.of(AgentStarted())])

    async def both_runners() -> bool:
        return {"agent:stays", "agent:goes"} <= first.subs.keys()

    await eventually(both_runners, timeout=5, what="both runners")
    await first.close()  # the orchestrator is away; its runners run on
    await eventlog.append("agent-goes", [NewEvent.of(AgentStopped(reason="by the user"))])
    await eventlog.append("agent-stays", [NewEvent.of(AgentUpdated(name="renamed"))])
    second = await start()
    (goes,), (stays,) = actors.instances["agent:goes"], actors.instances["agent:stays"]
    assert goes.killed and "agent:goes" not in second.subs
    assert not stays.killed and second.subs["agent:stays"].handle.impl is stays

    async def reloaded() -> bool:
        return stays.reloads == 1

    await eventually(reloaded, timeout=5, what="the runner that ran on to reload its config")


async def test_an_update_while_a_runner_is_restarted_is_reloaded_by_the_new_runner(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    """The new runner folds its config as it starts, which may be before the update commits; the reader, meeting
    the update while the runner was dead, asked nobody to reload: it answered with the old config until the next."""
    up = asyncio.Event()

    class Dies(Recorder):
        async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
            raise ActorDiedError()

    calls: list[str] = []

    class SlowStart(Recorder):  # has folded its config; its start finishes once the update is read
        async def ping(self) -> dict[str, Any]:
            await up.wait()
            return await super().ping()

        async def reload_config(self) -> None:
            await asyncio.sleep(0.2)  # a Ray call's while
            calls.append("reload")
            await super().reload_config()

        async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
            calls.append("deliver")
            await super().deliver(events, cursor)

    actors.make["agent:x"] = lambda nth: Dies() if nth == 0 else SlowStart()
    o = await start()
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
    await eventlog.append("chat-x/1", [NewEvent.of(MessageReceived(agent_id="x", chat_id="1", text="hi"))])

    async def restarting() -> bool:
        return len(actors.instances["agent:x"]) == 2 and o.subs["agent:x"].dead

    await eventually(restarting, timeout=5, what="the runner's restart under way")
    res = await eventlog.append("agent-x", [NewEvent.of(AgentUpdated(name="renamed"))])
    (update,) = await eventlog.read_stream("agent-x", res.versions[0])

    async def update_read() -> bool:
        return o.cursor >= update.cursor

    await eventually(update_read, timeout=5, what="the update read while the runner is dead")
    up.set()

    async def reloaded() -> bool:
        return actors.instances["agent:x"][1].reloads == 1

    await eventually(reloaded, timeout=5, what="the new runner to reload its config")

    async def redelivered() -> bool:
        return "deliver" in calls

    await eventually(redelivered, timeout=5, what="the message redelivered to the new runner")
    assert calls[0] == "reload"  # before the redelivery: messages after the update meet the new config
    assert not o.subs["agent:x"].dead and len(actors.instances["agent:x"]) == 2


async def test_a_slow_chat_does_not_hold_up_the_agents_other_chats(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    """A runner's delivery returns once its events are handled, and two were in flight at most: a chat whose
    completions are slow (a real model: seconds) in both held every other chat of the agent until one returned.
    Deliveries that have all been out for a moment let one more go, each such moment."""
    slow_done = asyncio.Event()

    class SlowChat(Recorder):
        async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
            await super().deliver(events, cursor)  # seen at once
            if any(e.stream == "chat-x/slow" for e in events):
                await slow_done.wait()  # handled when the model answers

    actors.make["agent:x"] = lambda _: SlowChat()
    o = await start()
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
    sub_ready = lambda: "agent:x" in o.subs  # noqa: E731
    for i in range(2):
        await eventlog.append("chat-x/slow", [NewEvent.of(MessageReceived(agent_id="x", chat_id="slow", text=f"{i}"))])

        async def out(n: int = i + 1) -> bool:
            return sub_ready() and o.subs["agent:x"].in_flight == n

        await eventually(out, timeout=5, what=f"{i + 1} slow deliveries in flight")
    res = await eventlog.append(
        "chat-x/quick", [NewEvent.of(MessageReceived(agent_id="x", chat_id="quick", text="hi"))]
    )
    try:

        async def quick_seen() -> bool:
            return res.positions[0] in positions(actors, "agent:x")

        await eventually(quick_seen, timeout=3, what="the quick chat's message delivered while the slow one waits")
        assert not slow_done.is_set() and o.subs["agent:x"].in_flight == 2  # the quick one has returned
    finally:
        slow_done.set()

    async def all_back() -> bool:
        return o.subs["agent:x"].in_flight == 0

    await eventually(all_back, timeout=5, what="every delivery returned")


async def test_a_runners_deliveries_say_where_the_one_before_ended(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    """So that the runner can register them in the order sent when Ray starts them out of order; a subscriber
    with one delivery at a time is not told."""
    o = await start()
    await route(o, "s", "chat")
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
    for i in range(5):
        await eventlog.append("chat-x/1", [NewEvent.of(MessageReceived(agent_id="x", chat_id="1", text=f"{i}"))])
        await asyncio.sleep(0.05)  # one delivery each, mostly

    async def all_seen() -> bool:
        return len(actors.seen("agent:x")) == 5

    await eventually(all_seen, timeout=5, what="every message delivered")
    sent = actors.instances["agent:x"][0].sent
    assert len(sent) >= 2 and all(after == end for (_, end), (after, _) in itertools.pairwise(sent))
    assert sent[0][0] is not None and sent[0][0] < sent[0][1]
    assert {after for after, _ in actors.instances["s"][0].sent} == {None}


async def test_a_store_outage_inside_a_subscriber_is_waited_out_not_restarted(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    class Outage(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
            self.calls += 1
            if self.calls <= orchestrator.FAULTS_BEFORE_RESTART + 1:
                raise StoreUnavailable("the store went away")
            await super().deliver(events, cursor)

    actors.make["s"] = lambda _: Outage()
    o = await start()
    await route(o, "s", "work")
    wanted = await put(eventlog, "work-1")

    await delivered_to(actors, "s", wanted, timeout=20, what="delivered once the store is back")
    assert len(actors.instances["s"]) == 1


async def test_a_runner_that_cannot_reload_its_config_does_not_stall_the_reader(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    class NoReload(Recorder):
        async def reload_config(self) -> None:
            raise RuntimeError("runner not started")

    actors.make["agent:x"] = lambda _: NoReload()
    o = await start()
    await route(o, "s", "work")
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
    await eventlog.append("agent-x", [NewEvent.of(AgentUpdated(name="renamed"))])
    wanted = await put(eventlog, "work-1")

    await delivered_to(actors, "s", wanted, timeout=10, what="events after the update routed")
    assert "agent:x" in o.subs

    async def restarted() -> bool:  # it would answer with the old config for good: a new one folds the new
        return len(actors.instances["agent:x"]) == 2 and actors.instances["agent:x"][0].killed

    await eventually(restarted, timeout=20, what="the runner that cannot reload to be restarted")


async def test_a_runner_that_cannot_reload_while_the_database_is_away_is_not_restarted(
    start: Start, actors: Actors, eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage is waited out: restarting runners for it would count toward ``agent.failed``."""

    class AwayStore(Recorder):
        async def reload_config(self) -> None:
            self.reloads += 1
            raise StoreUnavailable("event store unavailable: ConnectionRefusedError")

    monkeypatch.setattr(orchestrator, "RETRY_MAX_S", 0.05)
    actors.make["agent:x"] = lambda _: AwayStore()
    await start()
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])
    await eventlog.append("agent-x", [NewEvent.of(AgentUpdated(name="renamed"))])

    async def tried_often() -> bool:
        return len(actors.instances["agent:x"]) == 1 and actors.instances["agent:x"][0].reloads > 2 * 8

    await eventually(tried_often, timeout=10, what="reloads tried past the attempts that restart for other errors")
    assert len(actors.instances["agent:x"]) == 1 and not actors.instances["agent:x"][0].killed


async def test_a_restart_that_fails_is_tried_again(start: Start, actors: Actors, eventlog: EventLog) -> None:
    class Hung(Recorder):
        async def ping(self) -> dict[str, Any]:
            raise TimeoutError  # no answer: restart it

    actors.make["s"] = lambda nth: Hung() if nth == 0 else Recorder()
    o = await start()
    real = o.store.load_checkpoint
    outage = {"left": 2}

    async def load_checkpoint(name: str) -> Any:
        if name == "s" and "s" in o.subs and o.subs["s"].dead and outage["left"]:
            outage["left"] -= 1  # the store is away while the restart reads the checkpoint
            raise StoreUnavailable("the store went away")
        return await real(name)

    o.store.load_checkpoint = load_checkpoint  # type: ignore[method-assign]
    await route(o, "s", "work")

    async def back() -> bool:
        return len(actors.instances["s"]) == 2 and not o.subs["s"].dead

    await eventually(back, timeout=10, what="the subscriber restarted after failed restarts")
    assert outage["left"] == 0
    wanted = await put(eventlog, "work-1")

    await delivered_to(actors, "s", wanted, timeout=5, what="delivered after the restart")


async def test_a_restart_that_meets_a_stop_and_a_start_leaves_the_new_runner_alone(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    """The agent was stopped and started again while a restart of its hung runner read its checkpoint: the restart
    went on, killed the new start's runner and recorded ``agent.failed`` after the new ``agent.started``."""

    class Hung(Recorder):
        async def ping(self) -> dict[str, Any]:
            raise TimeoutError  # no answer: restart it

    actors.make["agent:x"] = lambda nth: Hung() if nth == 0 else Recorder()
    o = await start(max_restart_attempts=0)  # its first restart gives up: agent.failed
    real = o.store.load_checkpoint

    async def load_checkpoint(name: str) -> Any:
        old = o.subs.get(name)
        if name == "agent:x" and old is not None and old.dead:  # the restart reads the checkpoint: stop, start
            await eventlog.append(
                "agent-x", [NewEvent.of(AgentStopped(reason="by the user")), NewEvent.of(AgentStarted())]
            )

            async def started_again() -> bool:
                return o.subs.get(name) not in (None, old)

            await eventually(started_again, timeout=5, what="the stop and the new start acted on")
        return await real(name)

    o.store.load_checkpoint = load_checkpoint  # type: ignore[method-assign]
    await eventlog.append("agent-x", [NewEvent.of(AgentStarted())])

    async def runs_again() -> bool:
        return len(actors.instances["agent:x"]) == 2 and o.subs.get("agent:x") is not None

    await eventually(runs_again, timeout=15, what="the new start's runner")
    await asyncio.sleep(0.5)  # what the restart would have done after its read
    assert not actors.instances["agent:x"][1].killed
    assert "agent.failed" not in [e.type for e in await eventlog.read_stream("agent-x")]


# ---- 5. the orchestrator always comes up ------------------------------------------------------------------


async def test_a_store_outage_during_restore_is_retried(
    start: Start, monkeypatch: pytest.MonkeyPatch, eventlog: EventLog
) -> None:
    real = EventLog.head_cursor
    calls = {"n": 0}

    async def head_cursor(self: EventLog) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreUnavailable("the store went away")
        return await real(self)

    monkeypatch.setattr(EventLog, "head_cursor", head_cursor)
    o = await start()
    assert calls["n"] >= 2 and PROJECTOR in (await o.status())["subscribers"]


async def test_a_registration_whose_class_does_not_import_is_skipped(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    bad = SubscriberRegistered(subscription={"name": "gone"}, actor="no_such_module:Gone")
    good = SubscriberRegistered(
        subscription=Subscription(name="s", categories=frozenset({"work"})).model_dump(mode="json"),
        actor=f"{HERE}:Fake",
    )
    await eventlog.append("system-subscribers", [NewEvent.of(bad), NewEvent.of(good)])
    o = await start()
    assert "gone" not in o.subs and "s" in o.subs
    wanted = await put(eventlog, "work-1")

    await delivered_to(actors, "s", wanted, timeout=5, what="the good registration routed")


async def test_register_refuses_a_class_that_does_not_import(start: Start, eventlog: EventLog) -> None:
    o = await start()
    for actor in ("no_such_module:Gone", f"{HERE}:NoSuchClass", f"{HERE}:Recorder", "no colon"):
        with pytest.raises(ValueError, match="cannot route"):
            await o.register(Subscription(name="gone"), actor)
    assert await eventlog.read_stream("system-subscribers") == [] and "gone" not in o.subs


async def test_the_last_registration_of_a_name_is_routed_live_and_after_a_restart(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    """A name registered again otherwise (say, with a class that imports, after the recorded one stopped
    importing; or a system's new version) is routed so at once and after every restart: it was accepted live
    and lost at the next restart, or ignored. The same registration again records nothing."""
    broken = SubscriberRegistered(subscription={"name": "gone"}, actor="no_such_module:Gone")
    await eventlog.append("system-subscribers", [NewEvent.of(broken)], idempotency_key="register:gone")
    taken = SubscriberRegistered(subscription={"name": "agent:x"}, actor=f"{HERE}:Fake")  # before names were checked
    await eventlog.append("system-subscribers", [NewEvent.of(taken)])
    o = await start()
    assert "gone" not in o.subs and "agent:x" not in o.subs
    await route(o, "gone", "work")
    many = frozenset({"work", "other", "more", "again"})  # a set: its JSON order may differ between processes
    await o.register(Subscription(name="s", categories=many), f"{HERE}:Fake")
    await o.register(Subscription(name="s", categories=many), f"{HERE}:Fake")  # again: nothing recorded
    assert len(await eventlog.read_stream("system-subscribers")) == 4
    await route(o, "s", "work")  # otherwise: takes over, its actor restarted with it
    assert o.subs["s"].subscription.categories == {"work"}
    wanted = await put(eventlog, "work-1")
    await put(eventlog, "other-1")  # no longer routed to "s"

    async def routed() -> bool:
        return wanted[0] in positions(actors, "s") and positions(actors, "gone") == wanted

    await eventually(routed, timeout=5, what="both names routed by their last registration")
    assert "other-1" not in {e.stream for e in actors.instances["s"][-1].seen}
    for name in (PROJECTOR, "llm", runner_name("stopped")):  # the last: a runner's, though that agent runs none now
        with pytest.raises(ValueError, match=f"'{name}' is a system actor's name"):
            await route(o, name, "work")

    again = await start()  # a restart routes the last registration of each name
    assert again.subs["gone"].subscription.categories == {"work"} and again.subs["s"].subscription.categories == {
        "work"
    }
    await route(again, "s", "work")  # the same as recorded: nothing new
    assert len(await eventlog.read_stream("system-subscribers")) == 5


# ---- 7. a failed projection rebuild does not stop the projector ---------------------------------------------


async def test_a_failed_rebuild_leaves_the_projector_running(start: Start, actors: Actors, eventlog: EventLog) -> None:
    class CannotRebuild(Recorder):
        async def rebuild(self) -> None:
            raise RuntimeError("truncate failed")

    actors.make[PROJECTOR] = lambda _: CannotRebuild()
    o = await start()
    with pytest.raises(RuntimeError, match="truncate failed"):
        await o.rebuild_projection()
    sub = o.subs[PROJECTOR]
    assert not sub.dead and not sub.paused
    wanted = await put(eventlog, "agent-p")

    async def projected() -> bool:
        return positions(actors, PROJECTOR)[-1:] == wanted

    await eventually(projected, timeout=5, what="the projector still receives events")
    pings = actors.instances[PROJECTOR][-1].pings
    await eventually(lambda: _true(actors.instances[PROJECTOR][-1].pings > pings), timeout=5, what="still supervised")


# ---- 8. a stop drains: deliveries under way finish, every cursor is saved, nothing new starts --------------------


class Held(Recorder):
    """A subscriber whose deliveries wait for ``release`` (an LLM call under way, say)."""

    def __init__(self, release: asyncio.Event) -> None:
        super().__init__()
        self.release = release

    async def deliver(self, events: list[RecordedEvent], cursor: Any, after: Any = None) -> None:
        await self.release.wait()
        await super().deliver(events, cursor)


async def test_a_drain_lets_the_delivery_under_way_finish_saves_its_cursor_and_starts_no_other(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    release = asyncio.Event()
    actors.make["s"] = lambda _: Held(release)
    o = await start()
    await route(o, "s", "work")
    first = await put(eventlog, "work-1", 2)
    await eventually(lambda: _true(o.subs["s"].in_flight > 0), timeout=5, what="a delivery under way")
    queued = await put(eventlog, "work-2")  # read, and waiting for the delivery under way
    await eventually(lambda: _true(len(o.subs["s"].pending) > 0), timeout=5, what="an event queued behind it")

    drained = asyncio.ensure_future(o.drain(timeout=10))
    await asyncio.sleep(0.3)
    assert not drained.done()  # it waits for the delivery
    release.set()
    assert await asyncio.wait_for(drained, 5) == {}

    await asyncio.sleep(0.3)  # time enough to deliver the queued event, were deliveries still started
    assert positions(actors, "s") == first
    # The routing loop (which flushes cursors once a second) is stopped: the checkpoint is the drain's own, past the
    # finished delivery and short of the queued event, which the next start delivers.
    _, saved = await eventlog.load_checkpoint("s")
    assert first[-1] <= saved < queued[0]


async def test_a_drain_gives_up_on_a_delivery_that_does_not_finish_and_saves_no_cursor_past_it(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    actors.make["s"] = lambda _: Held(asyncio.Event())  # never released
    o = await start()
    await route(o, "s", "work")
    stuck = await put(eventlog, "work-1")
    await eventually(lambda: _true(o.subs["s"].in_flight > 0), timeout=5, what="a delivery under way")

    t0 = asyncio.get_running_loop().time()
    assert await o.drain(timeout=0.5) == {"s": 1}
    assert asyncio.get_running_loop().time() - t0 < 3
    _, saved = await eventlog.load_checkpoint("s")
    assert saved < stuck[0]  # the next start delivers it again


async def test_a_drain_while_the_orchestrator_still_waits_for_the_store_ends_it_at_once(actors: Actors) -> None:
    o = OrchestratorImpl(RuntimeConfig(database_url=f"postgresql://127.0.0.1:{free_port()}/nothing_listens"))
    await asyncio.sleep(0.3)
    assert not o.ready.is_set()
    assert await asyncio.wait_for(o.drain(timeout=10), 2) == {}
    assert o._main.done()


# ---- a transaction left open holds every delivery back: reported, not silent ------------------------------


async def test_a_transaction_left_open_is_reported_by_name_until_it_ends(
    start: Start, actors: Actors, eventlog: EventLog, db_url: str
) -> None:
    """A session idle in its transaction keeps every event committed after it from every subscriber (trap 1's
    price). After ``held_back_warn_s`` the orchestrator names it: a warning, its ping (``/healthz``), its status
    and the gauge; once it ends, the events go out and the report clears."""
    o = await start(held_back_warn_s=0.3)
    await route(o, "s", "work")
    blocker = await asyncpg.connect(db_url, server_settings={"application_name": "forgotten-psql"})
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("INSERT INTO secrets (ref, value) VALUES ('left-open', 'x')")
    try:
        with capture_logs() as logs:
            wanted = await put(eventlog, "work-1", 2)

            async def reported() -> bool:
                return (await o.ping())["held_back"] is not None

            await eventually(reported, timeout=5, what="the hold reported")
            held = (await o.ping())["held_back"]
            assert held["pid"] == blocker.get_server_pid() and held["application"] == "forgotten-psql"
            assert held["state"] == "idle in transaction" and held["for_s"] >= 0.3
            assert (await o.status())["held_back"]["transaction"] == held["transaction"]
            assert REGISTRY.get_sample_value("agenthub_log_held_back_seconds") >= 0.3
            assert positions(actors, "s") == []  # nothing delivered past the open transaction
            warnings = [e for e in logs if e["log_level"] == "warning" and "holds committed events" in e["event"]]
            assert len(warnings) == 1 and warnings[0]["pid"] == blocker.get_server_pid()
            await tx.commit()
            await delivered_to(actors, "s", wanted, timeout=5, what="the events, once the transaction ended")
        assert (await o.ping())["held_back"] is None
        assert REGISTRY.get_sample_value("agenthub_log_held_back_seconds") == 0
        assert any(e["event"] == "committed events no longer held back" for e in logs)
    finally:
        await blocker.close()


# ---- read-your-writes: a reader waiting for a subscriber is not held up by its linger ----------------------


async def test_a_reader_waiting_for_a_lingering_subscriber_gets_its_events_delivered_now(
    start: Start, actors: Actors, eventlog: EventLog
) -> None:
    """The projector waits between deliveries (``linger_s``) for larger batches; ``wait_routed`` (the API's
    ``?fresh=true``) must not wait that out. With a linger longer than the wait's timeout, the event read
    meanwhile is delivered at once for the reader, and the linger holds again once no one waits."""
    o = await start()
    await route(o, "s", "work")
    first = await put(eventlog, "work-1")
    await delivered_to(actors, "s", first, timeout=5, what="the first event")
    o.subs["s"].linger_s = 60.0
    second = await put(eventlog, "work-1")

    async def read() -> bool:
        return o.subs["s"].pending != []

    await eventually(read, timeout=5, what="the second event read and held by the linger")
    assert await o.wait_routed("s", await eventlog.last_cursor(), timeout=5)
    assert positions(actors, "s") == first + second and o.subs["s"].awaited == 0
    third = await put(eventlog, "work-1")
    await eventually(read, timeout=5, what="the third event read")
    assert positions(actors, "s") == first + second  # lingering again: no reader waits
    assert await o.wait_routed("s", await eventlog.last_cursor(), timeout=5)
    assert positions(actors, "s") == first + second + third

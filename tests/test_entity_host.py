"""The event-sourced entity host against a real Postgres: activation, conflicts, idempotency, passivation."""

from __future__ import annotations

from typing import Any

import pytest

from actors.entity import Context, Entity, EntityHost
from events import NewEvent, RecordedEvent
from events.hub import AgentStarted, AgentStopped
from storage.eventlog import EventLog


class Counter(Entity[dict]):
    """Counts ``agent.started`` messages it is sent, replying with ``agent.stopped`` (a stand-in effect)."""

    category = "counter"

    def __init__(self) -> None:
        self.decisions = 0

    def initial(self) -> dict:
        return {"seen": 0, "effects": 0}

    def evolve(self, state: dict, event: RecordedEvent) -> dict:
        if event.type == "agent.started":
            state["seen"] += 1
        elif event.type == "agent.stopped":
            state["effects"] += 1
        return state

    def key_of(self, message: RecordedEvent) -> str:
        return message.stream_id

    async def decide(self, state: dict, message: RecordedEvent, ctx: Context) -> list[NewEvent]:
        self.decisions += 1
        if ctx.effects_of(message):
            return []
        return [NewEvent.of(AgentStopped(reason=f"effect of {message.id}"))]

    def to_snapshot(self, state: dict) -> dict[str, Any]:
        return dict(state)

    def from_snapshot(self, data: dict[str, Any]) -> dict:
        return dict(data)


async def _message(log: EventLog, stream: str) -> RecordedEvent:
    res = await log.append(stream, [NewEvent.of(AgentStarted())])
    return (await log.read_stream(stream, res.versions[0]))[0]


async def test_redelivered_message_repeats_no_effect(eventlog: EventLog) -> None:
    host = EntityHost(Counter(), eventlog)
    msg = await _message(eventlog, "counter-a")
    first = await host.handle(msg)
    assert [e.type for e in first] == ["agent.stopped"]
    assert first[0].meta.causation_id == msg.id and first[0].meta.correlation_id == msg.id
    assert await host.handle(msg) == []  # same process, redelivered
    fresh = EntityHost(Counter(), eventlog)  # a restarted process folds the log and still skips it
    assert await fresh.handle(msg) == []
    assert [e.type for e in await eventlog.read_stream("counter-a")] == ["agent.started", "agent.stopped"]


async def test_conflict_reloads_and_retries(eventlog: EventLog) -> None:
    host = EntityHost(Counter(), eventlog)
    m1 = await _message(eventlog, "counter-b")
    await host.handle(m1)
    # another writer appends behind the host's back; the host's next append conflicts, reloads and retries
    m2 = await _message(eventlog, "counter-b")
    m3 = await _message(eventlog, "counter-b")
    await host.handle(m3)
    await host.handle(m2)
    state = host.active["b"].state
    assert state == {"seen": 3, "effects": 3}
    versions = [e.version for e in await eventlog.read_stream("counter-b")]
    assert versions == list(range(1, 7))


async def test_passivation_bounds_active_entities_and_reactivation_folds(eventlog: EventLog) -> None:
    host = EntityHost(Counter(), eventlog, max_active=2)
    for key in "xyz":
        await host.handle(await _message(eventlog, f"counter-{key}"))
    assert list(host.active) == ["y", "z"]
    await host.handle(await _message(eventlog, "counter-x"))
    assert host.active["x"].state == {"seen": 2, "effects": 2} and len(host.active) == 2
    assert host.activations == 4


async def test_snapshot_then_fold_of_the_tail(eventlog: EventLog) -> None:
    host = EntityHost(Counter(), eventlog, snapshot_every=4)
    for _ in range(3):
        await host.handle(await _message(eventlog, "counter-s"))
    snap = await eventlog.load_snapshot("counter-s")
    assert snap is not None and snap[0] == 6 and snap[1]["state"] == {"seen": 3, "effects": 3}
    await _message(eventlog, "counter-s")  # the tail after the snapshot
    loaded = await EntityHost(Counter(), eventlog).load("s")
    assert loaded.state == {"seen": 4, "effects": 3} and loaded.ctx.version == 7
    assert len(loaded.ctx.caused) == 3  # idempotency memory survives the snapshot


async def test_an_entity_remembers_only_its_newest_causes_also_across_snapshots(eventlog: EventLog) -> None:
    """A chat answers every message: remembering every cause made a long chat's memory and snapshots grow with
    its length. The newest few are what redelivery needs; an older message delivered again is handled again."""
    host = EntityHost(Counter(), eventlog, snapshot_every=1, remembered_causes=3)
    messages = [await _message(eventlog, "counter-r") for _ in range(6)]
    for m in messages:
        await host.handle(m)
    newest = [str(m.id) for m in messages[-3:]]
    assert list(host.active["r"].ctx.caused) == newest
    snap = await eventlog.load_snapshot("counter-r")
    assert snap is not None and [cause for cause, _ in snap[1]["causes"]] == newest  # in order, bounded
    restarted = EntityHost(Counter(), eventlog, remembered_causes=3)
    assert await restarted.handle(messages[-1]) == []  # a recent message redelivered: no second effect
    assert list(restarted.active["r"].ctx.caused) == newest
    again = await restarted.handle(messages[0])  # forgotten: the documented limit of the bound
    assert [e.type for e in again] == ["agent.stopped"]
    folded = await EntityHost(Counter(), eventlog, remembered_causes=3).load("r")  # snapshot + the tail after it
    assert list(folded.ctx.caused) == [*newest[1:], str(messages[0].id)]


async def test_a_snapshot_in_the_older_form_is_ignored_and_the_entity_refolds(eventlog: EventLog) -> None:
    msg = await _message(eventlog, "counter-o")
    await EntityHost(Counter(), eventlog).handle(msg)
    await eventlog.save_snapshot("counter-o", 2, {"state": {"seen": 99, "effects": 99}, "caused": {}})
    loaded = await EntityHost(Counter(), eventlog).load("o")
    assert loaded.state == {"seen": 1, "effects": 1} and loaded.ctx.effects_of(msg) == ["agent.stopped"]


class TwoSteps(Counter):
    """Records one effect per step; its second step raises, or (``broken_append``) its first's append does."""

    max_steps = 2

    def __init__(self) -> None:
        super().__init__()
        self.told: list[list[NewEvent]] = []

    async def decide(self, state: dict, message: RecordedEvent, ctx: Context) -> list[NewEvent]:
        if ctx.effects_of(message):
            raise RuntimeError("the second step's bug")
        return [NewEvent.of(AgentStopped(reason="step 1"))]

    def crashed(
        self, state: dict, message: RecordedEvent, ctx: Context, error: Exception, decided: list[NewEvent]
    ) -> list[NewEvent]:
        self.told.append(decided)
        return []


async def test_a_crash_is_told_the_decision_it_left_unrecorded_and_none_already_recorded(eventlog: EventLog) -> None:
    """``Entity.crashed`` keeps what that decision paid for: passed a decision already in the log, it was recorded
    twice (a team step's completion, counted twice against the run's budget)."""
    entity = TwoSteps()
    host = EntityHost(entity, eventlog)
    msg = await _message(eventlog, "counter-s")
    with pytest.raises(RuntimeError, match="the second step's bug") as crash:
        await host.handle(msg)
    await host.record_crash(msg, crash.value)
    assert entity.told == [[]]  # step 1's effect is in the log
    assert [e.type for e in await eventlog.read_stream("counter-s")] == ["agent.started", "agent.stopped"]

    class BrokenAppend:
        def __getattr__(self, name: str) -> Any:
            return getattr(eventlog, name)

        async def append(self, stream: str, events: list[NewEvent], *args: Any, **kw: Any) -> Any:
            raise RuntimeError("the append's bug")

    entity = TwoSteps()
    host = EntityHost(entity, BrokenAppend())  # type: ignore[arg-type]
    msg = await _message(eventlog, "counter-t")
    with pytest.raises(RuntimeError, match="the append's bug") as crash:
        await host.handle(msg)
    await host.record_crash(msg, crash.value)
    ((decided,),) = entity.told
    assert decided.data["reason"] == "step 1" and host.unrecorded == {}

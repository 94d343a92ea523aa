"""The hub projector against a real Postgres: a delivery that comes again is not projected twice."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from actors.agents.agent import fold_agent
from actors.config import RuntimeConfig
from actors.projections import PARKED_STREAM, PROJECTOR, ProjectorImpl
from events import NewEvent, RecordedEvent
from events.hub import (
    AgentCreated,
    AgentDeleted,
    AgentFailed,
    AgentSettings,
    AgentStarted,
    AgentStopped,
    LLMCompleted,
)
from storage.errors import StoreUnavailable
from storage.eventlog import EventLog


def completion(tokens: int) -> NewEvent:
    return NewEvent.of(
        LLMCompleted(
            agent_id="a",
            provider="scripted",
            model="m",
            text="hi",
            prompt_tokens=tokens,
            completion_tokens=1,
            total_tokens=tokens + 1,
            latency_ms=1.0,
            cost_usd=0.5,
            request_hash="h",
        )
    )


@pytest.fixture
async def projector(db_url: str) -> AsyncIterator[ProjectorImpl]:
    p = ProjectorImpl(RuntimeConfig(database_url=db_url))
    yield p
    if p.store is not None:
        await p.store.close()


async def usage(log: EventLog) -> tuple[int, int, float]:
    r = (await log.fetch("SELECT calls, prompt_tokens, cost_usd FROM proj_token_usage WHERE agent_id = 'a'"))[0]
    return int(r[0]), int(r[1]), float(r[2])


async def test_a_delivery_that_comes_again_is_not_counted_twice(projector: ProjectorImpl, eventlog: EventLog) -> None:
    await eventlog.append("agent-a", [completion(10), completion(20), completion(30)])
    e1, e2, e3 = await eventlog.read_all(0)
    assert await projector.deliver([e1, e2], e2.cursor) == e2.cursor
    # The commit's answer was lost, and the orchestrator sends the same delivery again.
    assert await projector.deliver([e1, e2], e2.cursor) == e2.cursor
    assert await usage(eventlog) == (2, 30, 1.0)
    # A rewind to an older cursor sends less than was projected: nothing is applied, the checkpoint stays.
    assert await projector.deliver([e1], e1.cursor) == e2.cursor
    assert await eventlog.load_checkpoint(PROJECTOR) == e2.cursor
    # A delivery overlapping what was projected applies only what is new.
    assert await projector.deliver([e2, e3], e3.cursor) == e3.cursor
    assert await usage(eventlog) == (3, 60, 1.5)
    assert projector.projected == 3


async def test_after_a_rebuild_everything_is_projected_again(projector: ProjectorImpl, eventlog: EventLog) -> None:
    await eventlog.append("agent-a", [completion(10), completion(20)])
    events: list[RecordedEvent] = await eventlog.read_all(0)
    await projector.deliver(events, events[-1].cursor)
    await projector.rebuild()
    await projector.deliver(events, events[-1].cursor)
    assert await usage(eventlog) == (2, 30, 1.0)


async def test_an_event_the_projection_cannot_apply_is_parked_and_the_rest_projected(
    projector: ProjectorImpl, eventlog: EventLog
) -> None:
    big = 2**62  # each fits the log and the column; their sum overflows bigint
    await eventlog.append("agent-a", [completion(10), completion(big), completion(big), completion(20)])
    events = await eventlog.read_all(0)

    assert await projector.deliver(events, events[-1].cursor) == events[-1].cursor
    assert await usage(eventlog) == (3, 10 + big + 20, 1.5)
    failed = await eventlog.read_stream(PARKED_STREAM)
    assert [(f.type, f.data["position"], f.data["event_id"]) for f in failed] == [
        ("projection.event_failed", events[2].position, str(events[2].id))
    ]
    assert "out of range" in failed[0].data["error"] and failed[0].data["subscriber"] == PROJECTOR
    assert failed[0].meta.causation_id == events[2].id
    assert await eventlog.load_checkpoint(PROJECTOR) == events[-1].cursor

    # The same delivery again (its commit's answer was lost) neither projects nor parks anything twice.
    assert await projector.deliver(events, events[-1].cursor) == events[-1].cursor
    assert await usage(eventlog) == (3, 10 + big + 20, 1.5)
    assert len(await eventlog.read_stream(PARKED_STREAM)) == 1


async def test_a_batch_that_fails_for_the_store_is_not_parked(projector: ProjectorImpl, eventlog: EventLog) -> None:
    await eventlog.append("agent-a", [completion(10)])
    events = await eventlog.read_all(0)
    store = await projector._store()
    await store.close()  # the store is gone for this projector: an outage, nothing wrong with the event

    with pytest.raises(StoreUnavailable):
        await projector.deliver(events, events[-1].cursor)
    projector.store = None
    assert await eventlog.read_stream(PARKED_STREAM) == []
    assert await eventlog.load_checkpoint(PROJECTOR) != events[-1].cursor


async def test_a_runner_failure_recorded_after_a_delete_brings_no_agent_back(
    projector: ProjectorImpl, eventlog: EventLog
) -> None:
    """The orchestrator gave up on a crash-looping runner just after the agent was deleted (or stopped): its
    ``agent.failed`` made the deleted agent exist again, in error, in the fold and in the list alike."""
    settings = AgentSettings()
    for agent_id, end in (("gone", AgentDeleted()), ("halted", AgentStopped(reason="by the user"))):
        created = AgentCreated(agent_id=agent_id, name=agent_id, settings=settings)
        failed = AgentFailed(reason="5 restarts")
        await eventlog.append(f"agent-{agent_id}", [NewEvent.of(e) for e in (created, AgentStarted(), end, failed)])
    await eventlog.append("agent-crashed", [NewEvent.of(AgentCreated(agent_id="crashed", name="c", settings=settings))])
    await eventlog.append("agent-crashed", [NewEvent.of(AgentStarted()), NewEvent.of(AgentFailed(reason="boom"))])
    events = await eventlog.read_all(0)
    await projector.deliver(events, events[-1].cursor)
    rows = {r[0]: (r[1], r[2]) for r in await eventlog.fetch("SELECT agent_id, status, last_error FROM proj_agents")}
    assert rows == {"gone": ("deleted", None), "halted": ("stopped", None), "crashed": ("error", "boom")}
    for agent_id, (status, error) in rows.items():
        folded = fold_agent(await eventlog.read_stream(f"agent-{agent_id}"))
        assert (folded.status, folded.last_error) == (status, error)
    assert not fold_agent(await eventlog.read_stream("agent-gone")).exists

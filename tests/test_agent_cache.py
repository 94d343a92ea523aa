"""The ingress's agent cache: the message route may use a fold up to a TTL old; every other read is fresh."""

from __future__ import annotations

import asyncio

import pytest
import ray

from actors.agents.agent import agent_stream
from events import NewEvent
from events.hub import AgentCreated, AgentSettings, AgentStarted, AgentStopped
from serve.hub import Hub, OrchestratorUnavailable
from serve.replies import ReplyWaiter
from storage.eventlog import EventLog


async def test_a_change_made_elsewhere_is_seen_within_the_ttl(eventlog: EventLog) -> None:
    hub = Hub(eventlog, orchestrator=None, reply_timeout_s=1)
    stream = agent_stream("cached")
    await eventlog.append(
        stream,
        [NewEvent.of(AgentCreated(agent_id="cached", name="c", settings=AgentSettings())), NewEvent.of(AgentStarted())],
    )
    assert (await hub.agent("cached", cached=True)).status == "running"

    await eventlog.append(stream, [NewEvent.of(AgentStopped())])  # another replica stops it
    assert (await hub.agent("cached", cached=True)).status == "running"  # the message route: within the TTL
    assert (await hub.agent("cached")).status == "stopped"  # any other read folds again
    assert (await hub.agent("cached", cached=True)).status == "stopped"  # and refreshes the cache

    await eventlog.append(stream, [NewEvent.of(AgentStarted())])
    hub.AGENT_TTL_S = 0.0  # once the TTL has passed, the message route folds again too
    assert (await hub.agent("cached", cached=True)).status == "running"


async def test_forgetting_an_agent_refolds_it_at_once(eventlog: EventLog) -> None:
    hub = Hub(eventlog, orchestrator=None, reply_timeout_s=1)
    stream = agent_stream("forgot")
    await eventlog.append(
        stream,
        [NewEvent.of(AgentCreated(agent_id="forgot", name="f", settings=AgentSettings())), NewEvent.of(AgentStarted())],
    )
    assert (await hub.agent("forgot", cached=True)).status == "running"
    await eventlog.append(stream, [NewEvent.of(AgentStopped())])
    hub.forget_agent("forgot")  # what this replica does after its own change
    assert (await hub.agent("forgot", cached=True)).status == "stopped"


async def test_a_fold_begun_before_a_change_does_not_overwrite_the_fresh_one(
    eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message route's fold starts, this replica stops the agent and refolds, then the slow fold finishes:
    the cache must keep the fold made after the stop."""
    hub = Hub(eventlog, orchestrator=None, reply_timeout_s=1)
    stream = agent_stream("slow")
    await eventlog.append(
        stream,
        [NewEvent.of(AgentCreated(agent_id="slow", name="s", settings=AgentSettings())), NewEvent.of(AgentStarted())],
    )
    read_stream, read, release = eventlog.read_stream, asyncio.Event(), asyncio.Event()

    async def slow_read(*args: object, **kwargs: object) -> object:
        events = await read_stream(*args, **kwargs)
        read.set()
        await release.wait()
        return events

    monkeypatch.setattr(eventlog, "read_stream", slow_read)
    slow_fold = asyncio.create_task(hub.agent("slow", cached=True))
    await read.wait()  # it has read the stream while the agent was running
    monkeypatch.setattr(eventlog, "read_stream", read_stream)
    await eventlog.append(stream, [NewEvent.of(AgentStopped())])  # this replica's stop
    hub.forget_agent("slow")
    assert (await hub.agent("slow")).status == "stopped"
    release.set()
    assert (await slow_fold).status == "running"  # its own caller gets what it read
    assert (await hub.agent("slow", cached=True)).status == "stopped"  # but the cache keeps the fresh fold


async def test_opening_the_hub_closes_its_pool_when_setup_fails(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[EventLog] = []
    connect = EventLog.connect

    async def spy(*args: object, **kwargs: object) -> EventLog:
        opened.append(await connect(*args, **kwargs))
        return opened[-1]

    def no_orchestrator(*_: object, **__: object) -> object:
        raise ValueError("Failed to look up actor 'orchestrator'")

    monkeypatch.setattr(EventLog, "connect", spy)
    monkeypatch.setattr(ray, "get_actor", no_orchestrator)
    with pytest.raises(OrchestratorUnavailable, match="no orchestrator actor in Ray namespace 'test'"):
        await Hub.open(db_url, namespace="test", reply_timeout_s=1, max_event_bytes=4096)
    assert len(opened) == 1 and opened[0].pool.is_closing()

    starting = asyncio.Event()

    async def never_started(self: ReplyWaiter) -> None:
        starting.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(ray, "get_actor", lambda *_, **__: object())
    monkeypatch.setattr(ReplyWaiter, "start", never_started)
    opening = asyncio.create_task(Hub.open(db_url, namespace="test", reply_timeout_s=1, max_event_bytes=4096))
    await asyncio.wait_for(starting.wait(), 10)
    opening.cancel()  # the replica's request gave up while the reply follower was starting
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert opened[1].pool.is_closing()

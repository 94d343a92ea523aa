"""The ingress's agent cache: the message route may use a fold up to a TTL old; every other read is fresh."""

from __future__ import annotations

from actors.agents.agent import agent_stream
from events import NewEvent
from events.hub import AgentCreated, AgentSettings, AgentStarted, AgentStopped
from serve.hub import Hub
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

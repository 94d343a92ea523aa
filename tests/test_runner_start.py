"""The agent runner's own start, in-process (no Ray): a call that arrives while it is still starting waits."""

from __future__ import annotations

import asyncio

from actors.agents.agent import agent_stream
from actors.agents.runner import AgentRunnerImpl
from actors.config import RuntimeConfig
from events import NewEvent
from events.hub import AgentCreated, AgentSettings, AgentUpdated
from storage.eventlog import EventLog


async def test_a_config_reload_while_the_runner_starts_waits_for_the_start(db_url: str, eventlog: EventLog) -> None:
    """The orchestrator asks a runner to reload after ``agent.updated``; the runner may still be connecting (it
    has no store yet). The reload used to fail then; now it waits for the start and folds the newest settings."""
    stream = agent_stream("a1")
    created = AgentCreated(agent_id="a1", name="a1", settings=AgentSettings(system_prompt="first"))
    await eventlog.append(stream, [NewEvent.of(created)])
    runner = AgentRunnerImpl(RuntimeConfig(database_url=db_url, heartbeat_interval_s=60), "a1")
    try:
        assert not hasattr(runner, "store")  # still connecting
        await eventlog.append(stream, [NewEvent.of(AgentUpdated(settings=AgentSettings(system_prompt="second")))])
        await asyncio.wait_for(runner.reload_config(), 10)
        assert runner.settings.system_prompt == "second"
    finally:
        runner._heartbeat.cancel()
        await runner.store.close()

"""AgentRunner: the Ray actor of one running agent (the seed's AgentRunner process), hosting its chats."""

from __future__ import annotations

import asyncio
import contextlib
import os

import ray
import structlog

from actors.agents.agent import agent_stream, fold_agent
from actors.agents.conversation import Conversation
from actors.config import RuntimeConfig
from actors.entity import EntityHost
from actors.llm.actor import build_router
from actors.llm.budget import BudgetExceededError, spent_usd
from actors.llm.providers import Completion, CompletionRequest
from actors.subscriber import EntityActor
from events import Subscription
from events.hub import AgentSettings

log = structlog.get_logger(__name__)


RUNNER_PREFIX = "agent:"


def runner_name(agent_id: str) -> str:
    """The Ray actor name, also the subscriber name: readable in the Ray dashboard."""
    return f"{RUNNER_PREFIX}{agent_id}"


def runner_subscription(agent_id: str) -> Subscription:
    return Subscription(
        name=runner_name(agent_id),
        types=frozenset({"chat.message_received"}),
        stream_prefix=f"chat-{agent_id}/",
    )


class AgentRunnerImpl(EntityActor):
    def __init__(self, config: RuntimeConfig, agent_id: str) -> None:
        self.agent_id = agent_id
        self.settings = AgentSettings()
        super().__init__(config, runner_name(agent_id))

    async def setup(self) -> None:
        await self._load_config()
        self.spent = await spent_usd(self.store, "agent_id", self.agent_id)
        # The agent's own LLM client, as in the seed's AgentRunner: the router the ``llm`` actor wraps, here
        # in-process, because the Ray call to a shared actor cost more CPU than the rest of a reply (see
        # docs/architecture.md). Hub agents name no scripts (those are the team's), so nothing is shared.
        self.router = build_router(self.config)
        self.host = self.hosts["chat"] = EntityHost(
            Conversation(lambda: self.settings, self._complete),
            self.store,
            max_active=self.config.max_active_entities,
            snapshot_every=self.config.snapshot_every,
        )
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeats())

    async def _complete(self, request: CompletionRequest) -> Completion:
        """One completion, within the agent's budget. Only this actor asks for the agent, so after the sum read
        at start the spending is counted here. An answer this message already paid for (its reply's append lost
        to the user's next message, and the chat decides again) is given even when it spent the budget."""
        budget = self.settings.budget_usd
        if budget is not None and self.spent >= budget and not self.router.paid_for(request):
            raise BudgetExceededError("agent", self.spent, budget)
        c = await self.router.complete(request)
        if not c.cached:  # a cached answer's cost, if it carries one, was counted when it was paid
            self.spent += c.cost_usd
        return c

    async def reload_config(self) -> None:
        """Refold the agent's config (the orchestrator calls this on ``agent.updated``); waits for the start, which
        may still be connecting."""
        await self._ready
        await self._load_config()

    async def _load_config(self) -> None:
        state = fold_agent(await self.store.read_stream(agent_stream(self.agent_id)))
        self.settings = state.settings

    async def _heartbeats(self) -> None:
        """Liveness telemetry (not events: see docs/architecture.md) for the status projection."""
        while True:
            with contextlib.suppress(Exception):
                await self.store.execute(
                    "INSERT INTO agent_heartbeats (agent_id, at, pid, active_chats, handled) "
                    "VALUES ($1, now(), $2, $3, $4) ON CONFLICT (agent_id) DO UPDATE SET at = now(), "
                    "pid = EXCLUDED.pid, active_chats = EXCLUDED.active_chats, handled = EXCLUDED.handled",
                    self.agent_id,
                    os.getpid(),
                    len(self.host.active),
                    self.host.handled,
                )
            await asyncio.sleep(self.config.heartbeat_interval_s)


AgentRunner = ray.remote(num_cpus=0, max_restarts=0)(AgentRunnerImpl)

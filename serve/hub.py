"""Per-replica state of the HTTP ingress: the event log, the orchestrator handle and the reply waiter."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable
from typing import TypeVar

from ray.exceptions import RayActorError

from actors.agents.agent import AgentState, agent_stream, fold_agent
from actors.projections import PROJECTOR
from events import RecordedEvent
from serve.replies import REPLY_TYPES, ReplyWaiter
from storage.eventlog import EventLog
from storage.secrets import SecretStore

T = TypeVar("T")


class OrchestratorUnavailable(Exception):
    """The orchestrator actor is missing, dead or restarting, or did not answer in time: a 503, retry later."""


class Hub:
    def __init__(self, store: EventLog, orchestrator: object, *, reply_timeout_s: float) -> None:
        self.store = store
        self.orchestrator = orchestrator
        self.reply_timeout_s = reply_timeout_s
        self.waiter = ReplyWaiter(store)
        self.secrets = SecretStore(store)
        self.team_registered = False
        self._agents: dict[str, tuple[float, AgentState]] = {}
        self._forgotten: dict[str, int] = {}  # agent → how often this replica forgot it (a generation)
        self._folding = 0

    @classmethod
    async def open(
        cls, database_url: str, *, namespace: str, reply_timeout_s: float, max_event_bytes: int, max_size: int = 10
    ) -> Hub:
        """Connect, find the orchestrator and start following replies; a failure (or cancellation) on the way
        closes what was opened, so a replica that retries on its next request leaks no pool."""
        import ray

        store = await EventLog.connect(
            database_url, max_size=max_size, max_event_bytes=max_event_bytes, run_migrations=False
        )
        hub: Hub | None = None
        try:
            try:  # a GCS round trip: off the event loop, which serves every other request meanwhile
                orchestrator = await asyncio.to_thread(ray.get_actor, "orchestrator", namespace=namespace)
            except ValueError:
                raise OrchestratorUnavailable(
                    f"no orchestrator actor in Ray namespace {namespace!r}: is the system up (agenthub up)?"
                ) from None
            hub = cls(store, orchestrator, reply_timeout_s=reply_timeout_s)
            await hub.waiter.start()
        except BaseException:
            if hub is not None:
                await hub.waiter.close()
            store.pool.terminate()  # at once: closing gracefully would wait on whatever the failure left behind
            raise
        return hub

    @staticmethod
    async def ask(call: Awaitable[T], timeout: float | None) -> T:
        """The answer of an orchestrator call; its death, or no answer within ``timeout``, is
        ``OrchestratorUnavailable`` (a request must not hang on a stuck actor)."""
        try:
            return await asyncio.wait_for(call, timeout)
        except RayActorError as e:
            raise OrchestratorUnavailable(f"orchestrator unavailable ({type(e).__name__}); retry later") from None
        except TimeoutError:
            if timeout is None:
                raise
            raise OrchestratorUnavailable(f"orchestrator did not answer within {timeout:g} s; retry later") from None

    AGENT_TTL_S = 1.0
    MAX_CACHED_AGENTS = 10_000

    async def agent(self, agent_id: str, *, cached: bool = False) -> AgentState:
        """The agent folded from its stream. ``cached``: a fold at most ``AGENT_TTL_S`` old will do (the message
        route: folding on every message cost more than the rest of the ingress's work). This replica's own
        changes refold at once; another replica's are seen within the TTL."""
        now = time.monotonic()
        hit = self._agents.get(agent_id)
        if cached and hit is not None and now - hit[0] < self.AGENT_TTL_S:
            return hit[1]
        generation = self._forgotten.get(agent_id, 0)
        self._folding += 1
        try:
            state = fold_agent(await self.store.read_stream(agent_stream(agent_id)))
        finally:
            self._folding -= 1
        if self._forgotten.get(agent_id, 0) != generation:
            return state  # forgotten while folding: a fold that began after this replica's change is cached instead
        if len(self._agents) >= self.MAX_CACHED_AGENTS:
            self._agents.clear()
        self._agents[agent_id] = (now, state)
        return state

    def forget_agent(self, agent_id: str) -> None:
        """After this replica changed the agent: drop its fold, and keep any fold begun before from being cached."""
        self._agents.pop(agent_id, None)
        if len(self._forgotten) >= self.MAX_CACHED_AGENTS and not self._folding:
            self._forgotten.clear()  # no fold in flight compares with a generation
        self._forgotten[agent_id] = self._forgotten.get(agent_id, 0) + 1

    @staticmethod
    def new_agent_id() -> str:
        return "agent_" + secrets.token_hex(6)

    async def projected(self, timeout: float) -> bool:
        """Whether the projector's read models caught up, within ``timeout``, with every event committed before
        this call (the orchestrator knows how far each subscriber got)."""
        target = await self.store.last_cursor()
        return await self.ask(self.orchestrator.wait_routed.remote(PROJECTOR, target, timeout), timeout + 2)

    async def original_of(self, position: int) -> RecordedEvent:
        (event,) = await self.store.read_all(position - 1, limit=1)
        return event

    async def find_reply(self, message: RecordedEvent) -> RecordedEvent | None:
        """The reply already recorded for ``message`` (for a retried request), if any."""
        return await self.store.effect_of(message, REPLY_TYPES)

    async def actor_metrics(self) -> dict[str, bytes]:
        from actors.observability import export_metrics

        pages = {"ingress": export_metrics()}
        with contextlib.suppress(Exception):
            pages.update(await asyncio.wait_for(self.orchestrator.actor_metrics.remote(), 5))
        return pages

"""The LLM actor: one Ray actor that owns provider clients, the response cache and the retry policy, and counts
every call that reaches a provider."""

from __future__ import annotations

import asyncio
from typing import Any

import ray
import structlog
from ray.exceptions import RayActorError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_fixed

from actors.config import RuntimeConfig
from actors.llm.cache import CompletionCache
from actors.llm.providers import Completion, CompletionRequest, ProviderError, ScriptRule, build_providers
from actors.llm.router import LLMRouter, RetryPolicy
from actors.observability import configure_logging, export_metrics
from events import NewEvent
from events.system import ScriptRegistered
from storage.errors import StoreUnavailable
from storage.eventlog import EventLog

__all__ = ["LLMActor", "build_providers", "build_router", "complete_via"]

log = structlog.get_logger(__name__)
SCRIPTS_STREAM = "llm-scripts"


def build_router(config: RuntimeConfig) -> LLMRouter:
    """The providers, retry policy and cache the config describes (the actor's whole state)."""
    return LLMRouter(
        build_providers(config),
        RetryPolicy(max_attempts=config.llm_max_attempts, timeout_s=config.llm_timeout_s),
        CompletionCache(ttl_s=config.llm_cache_ttl_s),
    )


async def complete_via(llm: Any, request: CompletionRequest) -> Completion:
    """Ask the LLM actor. Ray retries a call the actor died in once it is back (``max_task_retries``); if it
    stays gone, the caller gets a ``ProviderError`` it records as a failure, so no message waits forever."""
    try:
        return await llm.complete.remote(request)
    except RayActorError as e:
        raise ProviderError(f"the LLM actor is unavailable: {type(e).__name__}", retryable=True) from None


# Ray retries a call in flight when the actor dies, on the restarted actor: asking a provider again is safe,
# because the caller records the answer, not the actor.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class LLMActor:
    def __init__(self, config: RuntimeConfig) -> None:
        configure_logging()
        self.config = config
        self.router = build_router(config)
        self.store: EventLog | None = None
        self._ready = asyncio.get_running_loop().create_task(self._restore_scripts())

    async def _restore_scripts(self) -> None:
        """Named scripts are events, so a restarted actor knows them all again (once Postgres answers)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(StoreUnavailable),
            wait=wait_fixed(1),
            before_sleep=lambda state: log.warning("llm actor waiting for the event store", tries=state.attempt_number),
        )
        async for attempt in retrying:
            with attempt:
                if self.store is None:
                    self.store = await EventLog.connect(
                        self.config.database_url.get_secret_value(), max_size=2, run_migrations=False
                    )
                events = await self.store.read_stream(SCRIPTS_STREAM)
        for e in events:
            try:
                rules = [ScriptRule.model_validate(r) for r in e.data["rules"]]
            except (KeyError, TypeError, ValueError) as err:  # one bad record must not leave the actor unready
                log.error("skipping a script registration that does not validate", position=e.position, error=str(err))
                continue
            self.router.set_script(e.data["name"], rules)

    async def complete(self, request: CompletionRequest) -> Completion:
        if request.provider.startswith("scripted:"):
            await self._ready
        return await self.router.complete(request)

    async def set_script(self, name: str, rules: list[ScriptRule]) -> str:
        """Register ``scripted:<name>``, recorded as an event so a restarted actor has it too (registering the
        same rules again records nothing)."""
        await self._ready
        rules = [ScriptRule.model_validate(r) for r in rules]
        if self.router.script(name) != rules:  # the latest registration of a name wins, on restore too
            registered = ScriptRegistered(name=name, rules=[r.model_dump(mode="json") for r in rules])
            assert self.store is not None  # set once _ready is done
            await self.store.append(SCRIPTS_STREAM, [NewEvent.of(registered, actor="llm")])
        return self.router.set_script(name, rules)

    def usage(self) -> dict[str, Any]:
        return self.router.usage()

    def provider_calls(self) -> int:
        return self.router.provider_calls

    def metrics(self) -> bytes:
        return export_metrics()

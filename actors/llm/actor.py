"""The LLM actor: one Ray actor that owns provider clients, the response cache and the retry policy, and counts
every call that reaches a provider."""

from __future__ import annotations

from typing import Any

import ray

from actors.config import RuntimeConfig
from actors.llm.cache import CompletionCache
from actors.llm.providers import Completion, CompletionRequest, ScriptRule, build_providers
from actors.llm.router import LLMRouter, RetryPolicy
from actors.observability import export_metrics

__all__ = ["LLMActor", "build_providers", "build_router"]


def build_router(config: RuntimeConfig) -> LLMRouter:
    """The providers, retry policy and cache the config describes (the actor's whole state)."""
    return LLMRouter(
        build_providers(config),
        RetryPolicy(max_attempts=config.llm_max_attempts, timeout_s=config.llm_timeout_s),
        CompletionCache(ttl_s=config.llm_cache_ttl_s),
    )


@ray.remote(num_cpus=0, max_restarts=-1)
class LLMActor:
    def __init__(self, config: RuntimeConfig) -> None:
        self.router = build_router(config)

    async def complete(self, request: CompletionRequest) -> Completion:
        return await self.router.complete(request)

    def set_script(self, name: str, rules: list[ScriptRule]) -> str:
        """Register ``scripted:<name>``. Scripts live in memory: callers register again after an actor restart
        (it is idempotent)."""
        return self.router.set_script(name, rules)

    def usage(self) -> dict[str, Any]:
        return self.router.usage()

    def provider_calls(self) -> int:
        return self.router.provider_calls

    def metrics(self) -> bytes:
        return export_metrics()

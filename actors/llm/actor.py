"""The LLM actor: one Ray actor that owns provider clients and counts every call that reaches a provider."""

from __future__ import annotations

import ray

from actors import metrics
from actors.config import RuntimeConfig
from actors.llm.providers import (
    Completion,
    CompletionRequest,
    OpenAICompatibleProvider,
    Provider,
    ProviderError,
    ScriptedProvider,
)
from actors.observability import export_metrics


def build_providers(config: RuntimeConfig) -> dict[str, Provider]:
    key = config.openai_api_key.get_secret_value() if config.openai_api_key else None
    return {
        "scripted": ScriptedProvider(),
        "openai": OpenAICompatibleProvider("openai", key, config.openai_base_url),
        "openai_compatible": OpenAICompatibleProvider("openai_compatible", key, None),
    }


@ray.remote(num_cpus=0, max_restarts=-1)
class LLMActor:
    def __init__(self, config: RuntimeConfig) -> None:
        self.providers = build_providers(config)
        self.calls = 0

    async def complete(self, request: CompletionRequest) -> Completion:
        provider = self.providers.get(request.provider)
        if provider is None:
            raise ProviderError(f"unknown provider {request.provider!r}")
        self.calls += 1
        metrics.LLM_CALLS.labels(request.provider).inc()
        c = await provider.complete(request)
        metrics.LLM_TOKENS.labels(c.provider, c.model, "prompt").inc(c.prompt_tokens)
        metrics.LLM_TOKENS.labels(c.provider, c.model, "completion").inc(c.completion_tokens)
        return c

    def provider_calls(self) -> int:
        return self.calls

    def metrics(self) -> bytes:
        return export_metrics()

"""LLM providers behind one interface: OpenAI, Anthropic, any OpenAI-compatible server and the scripted provider.

The public names of the LLM layer live here (callers import them from this module); the implementations are in
the sibling modules."""

from __future__ import annotations

from typing import Any

from actors.config import RuntimeConfig
from actors.llm.anthropic_provider import AnthropicProvider
from actors.llm.base import (
    ChatMessage,
    Completion,
    CompletionRequest,
    Provider,
    ProviderError,
    StructuredOutputError,
    count_tokens,
)
from actors.llm.openai_provider import OpenAICompatibleProvider
from actors.llm.scripted import ScriptedProvider, ScriptRule
from events.hub import LLMCompleted

__all__ = [
    "AnthropicProvider",
    "ChatMessage",
    "Completion",
    "CompletionRequest",
    "OpenAICompatibleProvider",
    "Provider",
    "ProviderError",
    "ScriptRule",
    "ScriptedProvider",
    "StructuredOutputError",
    "build_providers",
    "completed_event",
    "count_tokens",
]


def build_providers(config: RuntimeConfig) -> dict[str, Provider]:
    """Every provider the config makes usable; keys stay ``SecretStr`` until a client is built.

    ``openai_compatible`` is for an agent's own server (its ``base_url``): it never holds the server's OpenAI key,
    which goes only to ``openai_base_url`` (or api.openai.com)."""
    timeout = config.llm_timeout_s
    return {
        "scripted": ScriptedProvider(),
        "openai": OpenAICompatibleProvider("openai", config.openai_api_key, config.openai_base_url, timeout),
        "openai_compatible": OpenAICompatibleProvider("openai_compatible", None, None, timeout),
        "anthropic": AnthropicProvider("anthropic", config.anthropic_api_key, config.anthropic_base_url, timeout),
    }


def completed_event(c: Completion, request: CompletionRequest, agent_id: str, **extra: Any) -> LLMCompleted:
    """The ``llm.completed`` payload that records ``c``: what replay reads instead of calling the provider."""
    return LLMCompleted(
        agent_id=agent_id,
        provider=c.provider,
        model=c.model,
        text=c.text,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        total_tokens=c.total_tokens,
        latency_ms=c.latency_ms,
        cost_usd=c.cost_usd,
        request_hash=c.request_hash or request.digest(),
        cached=c.cached,
        **extra,
    )

"""LLM providers behind one interface: OpenAI, Anthropic, any OpenAI-compatible server and the scripted provider.

The public names of the LLM layer live here (callers import them from this module); the implementations are in
the sibling modules."""

from __future__ import annotations

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
    "count_tokens",
]


def build_providers(config: RuntimeConfig) -> dict[str, Provider]:
    """Every provider the config makes usable; keys stay ``SecretStr`` until a client is built."""
    timeout = config.llm_timeout_s
    return {
        "scripted": ScriptedProvider(),
        "openai": OpenAICompatibleProvider("openai", config.openai_api_key, config.openai_base_url, timeout),
        "openai_compatible": OpenAICompatibleProvider("openai_compatible", config.openai_api_key, None, timeout),
        "anthropic": AnthropicProvider("anthropic", config.anthropic_api_key, config.anthropic_base_url, timeout),
    }

"""OpenAI chat completions through the ``openai`` client: api.openai.com or any compatible base URL."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from actors.llm.base import (
    Completion,
    CompletionRequest,
    ProviderError,
    SdkProvider,
    StructuredOutputError,
    elapsed_ms,
    parse_structured,
    sdk_error,
)

if TYPE_CHECKING:
    from openai import AsyncOpenAI

# Reasoning models take max_completion_tokens and only the default temperature.
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
# Keywords strict structured outputs do not take (OpenAI's "supported schemas"); ``anyOf`` is the one combinator.
_NOT_STRICT = frozenset(
    {"allOf", "oneOf", "not", "if", "then", "else", "patternProperties", "dependentSchemas", "dependentRequired"}
)


def strict_compatible(schema: dict[str, Any]) -> bool:
    """Whether OpenAI's strict mode accepts ``schema``: an object at the root, every object closed
    (``additionalProperties: false``) with all its properties required, no keyword strict mode lacks. Strict mode
    answers any other schema with HTTP 400, so such a schema is sent non-strict (the router still checks the
    answer against it)."""
    return _is_object(schema) and _strict_node(schema)


def _is_object(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in node


def _strict_node(node: Any) -> bool:
    if isinstance(node, list):
        return all(_strict_node(n) for n in node)
    if not isinstance(node, dict):
        return True
    if not _NOT_STRICT.isdisjoint(node):
        return False
    properties = node.get("properties", {})
    if _is_object(node):
        closed = node.get("additionalProperties") is False
        if not closed or set(node.get("required", [])) != set(properties):
            return False
    nested = [*properties.values(), node.get("items"), node.get("anyOf")]
    nested += [*node.get("$defs", {}).values(), *node.get("definitions", {}).values()]
    return all(_strict_node(n) for n in nested)


class OpenAICompatibleProvider(SdkProvider["AsyncOpenAI"]):
    """OpenAI's chat completions against api.openai.com or any compatible server (vLLM, llama.cpp, Ollama).

    The SDK's own retries are off (``max_retries=0``): the router owns the retry policy, so attempts are counted
    and ``retry-after`` is honoured in one place. The configured key goes only to the configured base URL (see
    ``server_key_for``)."""

    def _client(self, request: CompletionRequest) -> AsyncOpenAI:
        return self._client_for(request.base_url or self.base_url, self._key_for(request) or "not-needed")

    def _new_client(self, url: str | None, key: str) -> AsyncOpenAI:
        from openai import AsyncOpenAI

        return AsyncOpenAI(api_key=key, base_url=url, timeout=self.timeout, max_retries=0)

    def _params(self, request: CompletionRequest) -> dict[str, Any]:
        reasoning = request.model.startswith(_REASONING_PREFIXES)
        params: dict[str, Any] = {
            "model": request.model,
            "messages": [m.model_dump() for m in request.messages],
            "timeout": request.timeout_s or self.timeout,
        }
        # The official API wants max_completion_tokens; compatible servers widely know only max_tokens.
        params["max_completion_tokens" if self.name == "openai" else "max_tokens"] = request.max_tokens
        if not reasoning:
            params["temperature"] = request.temperature
        if request.response_schema is not None:
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": request.schema_name,
                    "schema": request.response_schema,
                    "strict": strict_compatible(request.response_schema),
                },
            }
        return params

    async def complete(self, request: CompletionRequest) -> Completion:
        import openai

        started = time.perf_counter()
        try:
            resp = await self._client(request).chat.completions.create(**self._params(request))
        except openai.OpenAIError as e:
            raise sdk_error(self.name, e, self._secrets(request)) from None
        if not resp.choices:
            raise ProviderError(f"{self.name}: the response has no choices")
        choice = resp.choices[0]
        text = choice.message.content or ""
        structured = None
        if request.response_schema is not None:
            refusal = getattr(choice.message, "refusal", None)
            if refusal:
                raise StructuredOutputError(f"{self.name}: the model refused the structured answer: {refusal[:200]}")
            structured = parse_structured(self.name, text, truncated=choice.finish_reason == "length")
        usage = resp.usage
        return Completion(
            text=text,
            provider=self.name,
            model=resp.model or request.model,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_ms=elapsed_ms(started),
            structured=structured,
        )

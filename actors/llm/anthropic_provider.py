"""Anthropic's messages API through the ``anthropic`` client; structured answers come back as a forced tool call."""

from __future__ import annotations

import json
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
    from anthropic import AsyncAnthropic


class AnthropicProvider(SdkProvider["AsyncAnthropic"]):
    """Claude through ``anthropic.AsyncAnthropic``: system messages go to ``system=``; a schema becomes the one
    tool the model must call, and its input is the structured answer.

    The SDK's own retries are off (``max_retries=0``): the router owns the retry policy. The configured key goes
    only to the configured base URL (see ``server_key_for``)."""

    def _client(self, request: CompletionRequest) -> AsyncAnthropic:
        url = request.base_url or self.base_url
        key = self._key_for(request)
        if key is None and url is None:
            raise ProviderError(f"{self.name}: no API key configured (set AGENTHUB_ANTHROPIC_API_KEY)")
        return self._client_for(url, key or "not-needed")

    def _new_client(self, url: str | None, key: str) -> AsyncAnthropic:
        from anthropic import AsyncAnthropic

        return AsyncAnthropic(api_key=key, base_url=url, timeout=self.timeout, max_retries=0)

    def _params(self, request: CompletionRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": _turns(request),
            "timeout": request.timeout_s or self.timeout,
            # Not a named argument of every SDK release, but part of the messages API.
            "extra_body": {"temperature": request.temperature},
        }
        system = request.system_prompt()
        if system:
            params["system"] = system
        if request.response_schema is not None:
            params["tools"] = [
                {
                    "name": request.schema_name,
                    "description": "Give the answer as this tool's input.",
                    "input_schema": request.response_schema,
                }
            ]
            params["tool_choice"] = {"type": "tool", "name": request.schema_name}
        return params

    async def complete(self, request: CompletionRequest) -> Completion:
        import anthropic

        started = time.perf_counter()
        try:
            resp = await self._client(request).messages.create(**self._params(request))
        except anthropic.AnthropicError as e:
            raise sdk_error(self.name, e, self._secrets(request)) from None
        text = "".join(getattr(b, "text", "") for b in resp.content if b.type == "text")
        structured = None
        if request.response_schema is not None:
            structured = self._tool_input(request, resp.content, truncated=resp.stop_reason == "max_tokens")
            text = json.dumps(structured)
        return Completion(
            text=text,
            provider=self.name,
            model=resp.model or request.model,
            prompt_tokens=resp.usage.input_tokens,
            completion_tokens=resp.usage.output_tokens,
            latency_ms=elapsed_ms(started),
            structured=structured,
        )

    def _tool_input(self, request: CompletionRequest, content: list[Any], *, truncated: bool) -> dict[str, Any]:
        hint = " (the answer was cut off at max_tokens)" if truncated else ""
        call = next((b for b in content if b.type == "tool_use" and b.name == request.schema_name), None)
        if call is None:
            raise StructuredOutputError(f"{self.name}: the model did not call the {request.schema_name!r} tool{hint}")
        value = call.input
        if isinstance(value, str):  # some compatible gateways pass the arguments through as a JSON string
            return parse_structured(self.name, value, truncated=truncated)
        if not isinstance(value, dict):
            raise StructuredOutputError(
                f"{self.name}: the {request.schema_name!r} tool input is {type(value).__name__}, "
                f"not a JSON object{hint}"
            )
        return value


def _turns(request: CompletionRequest) -> list[dict[str, str]]:
    """The conversation without system messages (they go to ``system=``), starting at a user turn: the messages
    API refuses a first assistant turn (400), and a chat's history trimmed to its bound starts with one every other
    reply."""
    turns = [{"role": m.role, "content": m.content} for m in request.messages if m.role != "system"]
    first_user = next((i for i, t in enumerate(turns) if t["role"] == "user"), 0)
    return turns[first_user:]

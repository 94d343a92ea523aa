"""Anthropic's messages API through the ``anthropic`` client; structured answers come back as a forced tool call."""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from actors.llm.base import (
    Completion,
    CompletionRequest,
    ProviderError,
    StructuredOutputError,
    elapsed_ms,
    parse_structured,
    sdk_error,
    secret_value,
    server_key_for,
)

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic


class AnthropicProvider:
    """Claude through ``anthropic.AsyncAnthropic``: system messages go to ``system=``; a schema becomes the one
    tool the model must call, and its input is the structured answer.

    The SDK's own retries are off (``max_retries=0``): the router owns the retry policy. The configured key goes
    only to the configured base URL (see ``server_key_for``)."""

    def __init__(
        self,
        name: str = "anthropic",
        api_key: SecretStr | str | None = None,
        base_url: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.name = name
        key = secret_value(api_key)
        self._key = SecretStr(key) if key else None
        self.base_url = base_url
        self.timeout = timeout
        self._clients: dict[tuple[str | None, str], AsyncAnthropic] = {}

    def __repr__(self) -> str:
        return f"AnthropicProvider(name={self.name!r}, base_url={self.base_url!r})"

    def _client(self, request: CompletionRequest) -> AsyncAnthropic:
        url = request.base_url or self.base_url
        key = server_key_for(self.name, self.base_url, secret_value(self._key), request)
        if key is None and url is None:
            raise ProviderError(f"{self.name}: no API key configured (set AGENTHUB_ANTHROPIC_API_KEY)")
        key = key or "not-needed"
        slot = (url, hashlib.sha256(key.encode()).hexdigest())
        if slot not in self._clients:
            from anthropic import AsyncAnthropic

            self._clients[slot] = AsyncAnthropic(api_key=key, base_url=url, timeout=self.timeout, max_retries=0)
        return self._clients[slot]

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
            raise sdk_error(self.name, e, [secret_value(self._key), secret_value(request.api_key)]) from None
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

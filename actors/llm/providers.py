"""LLM providers behind one interface: the deterministic scripted provider and any OpenAI-compatible API."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Protocol

from pydantic import BaseModel, Field


class ChatMessage(BaseModel):
    role: str
    content: str


class CompletionRequest(BaseModel):
    provider: str
    model: str
    messages: list[ChatMessage]
    temperature: float = 0.7
    max_tokens: int = 512
    base_url: str | None = None

    def digest(self) -> str:
        """Stable hash of what was asked: recorded with the completion, used to match it on replay."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:32]


class Completion(BaseModel):
    text: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float = Field(ge=0)
    cost_usd: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ProviderError(Exception):
    """The provider failed; the caller records a failure event instead of a completion."""


class Provider(Protocol):
    name: str

    async def complete(self, request: CompletionRequest) -> Completion: ...


def count_tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: words and punctuation runs."""
    return max(1, len(text.split()))


class ScriptedProvider:
    """Deterministic replies for tests and the demo: the same request always gives the same completion.

    It answers with the turn number and the last user message, so a reply proves how much history the
    agent had (which is how the demo shows an agent recovered its conversation from the log)."""

    name = "scripted"

    async def complete(self, request: CompletionRequest) -> Completion:
        started = time.perf_counter()
        user_turns = [m.content for m in request.messages if m.role == "user"]
        last = user_turns[-1] if user_turns else ""
        text = f"[{request.model}] turn {len(user_turns)}: you said {last!r}"
        prompt = sum(count_tokens(m.content) for m in request.messages)
        return Completion(
            text=text,
            provider=self.name,
            model=request.model,
            prompt_tokens=prompt,
            completion_tokens=count_tokens(text),
            latency_ms=(time.perf_counter() - started) * 1000,
        )


class OpenAICompatibleProvider:
    """OpenAI's chat completions through the ``openai`` client, against api.openai.com or any compatible
    base URL (vLLM, llama.cpp server, Ollama)."""

    def __init__(self, name: str, api_key: str | None, base_url: str | None, timeout: float = 60.0) -> None:
        self.name = name
        self.api_key = api_key or "not-needed"
        self.base_url = base_url
        self.timeout = timeout
        self._clients: dict[str | None, object] = {}

    def _client(self, base_url: str | None):
        url = base_url or self.base_url
        if url not in self._clients:
            from openai import AsyncOpenAI

            self._clients[url] = AsyncOpenAI(api_key=self.api_key, base_url=url, timeout=self.timeout, max_retries=2)
        return self._clients[url]

    async def complete(self, request: CompletionRequest) -> Completion:
        import openai

        started = time.perf_counter()
        try:
            resp = await self._client(request.base_url).chat.completions.create(
                model=request.model,
                messages=[m.model_dump() for m in request.messages],
                temperature=request.temperature,
                max_tokens=request.max_tokens,
            )
        except openai.OpenAIError as e:
            raise ProviderError(f"{self.name}: {type(e).__name__}: {e}") from e
        usage = resp.usage
        return Completion(
            text=resp.choices[0].message.content or "",
            provider=self.name,
            model=resp.model or request.model,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

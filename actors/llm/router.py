"""How the LLM actor calls providers: timeouts, retries with backoff, a fallback, the cache, cost and usage.

Kept apart from the Ray actor so the whole policy is tested with plain asyncio against local HTTP servers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from actors import metrics
from actors.llm.base import Completion, CompletionRequest, Provider, ProviderError, conform
from actors.llm.cache import CompletionCache
from actors.llm.pricing import cost_usd
from actors.llm.scripted import ScriptedProvider, ScriptRule

log = structlog.get_logger(__name__)

UNATTRIBUTED = "unattributed"


class RetryPolicy(BaseModel):
    """Per attempt: a deadline. Between attempts: exponential backoff with jitter, or the server's
    ``retry-after`` (capped) when it sent one."""

    model_config = ConfigDict(frozen=True)

    max_attempts: int = Field(4, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    backoff_initial_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(8.0, ge=0)
    jitter_s: float = Field(0.5, ge=0)
    retry_after_cap_s: float = Field(30.0, ge=0)


class AgentUsage(BaseModel):
    """In-memory totals for one agent; the durable accounting is the callers' ``llm.completed`` events."""

    completions: int = 0
    cached: int = 0
    failures: int = 0
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class _RetryWait(wait_base):
    """The server's ``retry-after`` when given (it knows when it will take us again), else backoff."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.cap = policy.retry_after_cap_s
        self.backoff = wait_exponential_jitter(
            initial=policy.backoff_initial_s, max=policy.backoff_max_s, jitter=policy.jitter_s
        )

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, ProviderError) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, self.cap)
        return float(self.backoff(retry_state))


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retryable


def _log_retry(provider: str, model: str, retry_state: RetryCallState) -> None:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    log.warning(
        "llm.retry",
        provider=provider,
        model=model,
        attempt=retry_state.attempt_number,
        wait_s=round(retry_state.next_action.sleep if retry_state.next_action else 0.0, 3),
        error=str(exc),
    )


class LLMRouter:
    """Answers a ``CompletionRequest`` from the cache or a provider, under the retry policy, with the request's
    fallback once the primary gives up; fills in cost, attempts and per-agent usage."""

    def __init__(
        self,
        providers: dict[str, Provider],
        policy: RetryPolicy | None = None,
        cache: CompletionCache | None = None,
    ) -> None:
        self.providers = dict(providers)
        self.policy = policy or RetryPolicy()
        # The strategies hold no state of a call, so every call shares them (building them cost 3.6 µs a call);
        # the ``AsyncRetrying`` that runs them keeps its state on itself, so each call gets its own.
        self._stop = stop_after_attempt(self.policy.max_attempts)
        self._wait = _RetryWait(self.policy)
        self._retryable = retry_if_exception(_retryable)
        self.cache = cache
        self.provider_calls = 0
        self._usage: dict[str, AgentUsage] = {}
        self._scripts: dict[str, list[ScriptRule]] = {}

    def script(self, name: str) -> list[ScriptRule] | None:
        return self._scripts.get(name)

    def set_script(self, name: str, rules: list[ScriptRule]) -> str:
        """Register the scripted provider ``scripted:<name>``; returns the provider name to put in requests."""
        provider = f"scripted:{name}"
        rules = [ScriptRule.model_validate(r) for r in rules]
        if self._scripts.get(name) != rules and self.cache is not None:
            self.cache.clear()  # answers cached under the old script are not what the new one says
        self._scripts[name] = rules
        self.providers[provider] = ScriptedProvider(rules, name=provider)
        return provider

    def paid_for(self, request: CompletionRequest) -> bool:
        """Whether the cache holds the answer to ``request`` that its own recorder paid for and never recorded:
        asking again costs nothing more, so a budget spent by that very answer must not refuse it."""
        if not (request.cache and request.record_key and self.cache is not None):
            return False
        entry = self.cache.get_entry(request.digest())
        return entry is not None and entry[1] == request.record_key

    async def complete(self, request: CompletionRequest) -> Completion:
        use_cache = request.cache and self.cache is not None
        key = request.digest()
        if use_cache and self.cache is not None:
            entry = self.cache.get_entry(key)
            if entry is not None:
                hit, paid_by = entry
                self._agent(request).cached += 1
                # The same recorder asking again never recorded the answer it paid for (a decision retried after a
                # version conflict, a step redone after a crash): its record must carry that cost, or the log's
                # sums (budgets, usage) miss it. Anyone else reuses an answer that cost nothing more.
                unrecorded = request.record_key is not None and request.record_key == paid_by
                cost = hit.cost_usd if unrecorded else 0.0
                return hit.model_copy(update={"cached": True, "latency_ms": 0.0, "cost_usd": cost, "attempts": 0})
        try:
            c = await self._with_fallback(request)
        except ProviderError as e:
            usage = self._agent(request)
            usage.failures += 1
            usage.attempts += e.attempts
            log.warning("llm.failed", provider=request.provider, model=request.model, attempts=e.attempts, error=str(e))
            raise
        c.request_hash = key
        if use_cache and self.cache is not None:
            self.cache.put(key, c, request.record_key)
        usage = self._agent(request)
        usage.completions += 1
        usage.attempts += c.attempts
        usage.prompt_tokens += c.prompt_tokens
        usage.completion_tokens += c.completion_tokens
        usage.cost_usd = round(usage.cost_usd + c.cost_usd, 10)
        metrics.LLM_TOKENS.labels(c.provider, c.model, "prompt").inc(c.prompt_tokens)
        metrics.LLM_TOKENS.labels(c.provider, c.model, "completion").inc(c.completion_tokens)
        return c

    def usage(self) -> dict[str, Any]:
        total = AgentUsage()
        for u in self._usage.values():
            for field in AgentUsage.model_fields:
                setattr(total, field, getattr(total, field) + getattr(u, field))
        total.cost_usd = round(total.cost_usd, 10)
        return {
            "agents": {agent: u.model_dump() for agent, u in sorted(self._usage.items())},
            "total": total.model_dump(),
            "provider_calls": self.provider_calls,
            "cache": self.cache.stats() if self.cache is not None else None,
        }

    def _agent(self, request: CompletionRequest) -> AgentUsage:
        agent = request.agent_id or UNATTRIBUTED
        usage = self._usage.get(agent)
        if usage is None:  # not ``setdefault``: that would build a model on every completion
            usage = self._usage[agent] = AgentUsage()
        return usage

    async def _with_fallback(self, request: CompletionRequest) -> Completion:
        try:
            return await self._with_retries(request)
        except ProviderError as primary:
            fallback = self._fallback_request(request)
            if fallback is None:
                raise
            log.warning(
                "llm.fallback",
                provider=request.provider,
                model=request.model,
                fallback_provider=fallback.provider,
                fallback_model=fallback.model,
                error=str(primary),
            )
            try:
                c = await self._with_retries(fallback)
            except ProviderError as e:
                raise ProviderError(
                    f"{primary}; fallback {fallback.provider}/{fallback.model} failed too: {e}",
                    status=e.status,
                    attempts=primary.attempts + e.attempts,
                ) from None
            return c.model_copy(update={"attempts": primary.attempts + c.attempts, "fallback_used": True})

    @staticmethod
    def _fallback_request(request: CompletionRequest) -> CompletionRequest | None:
        if request.fallback_provider is None and request.fallback_model is None:
            return None
        provider = request.fallback_provider or request.provider
        return request.model_copy(
            update={
                "provider": provider,
                "model": request.fallback_model or request.model,
                # the primary's base URL (and its key) name the primary's server
                "base_url": request.base_url if provider == request.provider else None,
                "api_key": request.api_key if provider == request.provider else None,
                "fallback_provider": None,
                "fallback_model": None,
            }
        )

    async def _with_retries(self, request: CompletionRequest) -> Completion:
        provider = self.providers.get(request.provider)
        if provider is None:
            hint = " (register it with LLMActor.set_script)" if request.provider.startswith("scripted:") else ""
            raise ProviderError(f"unknown provider {request.provider!r}{hint}", attempts=0)
        timeout = request.timeout_s or self.policy.timeout_s
        request = request.model_copy(update={"timeout_s": timeout})
        attempts = 0

        async def attempt() -> Completion:
            nonlocal attempts
            attempts += 1
            return await self._attempt(provider, request)

        try:
            try:
                c = await attempt()
            except ProviderError as first:
                c = await self._retry(first, attempt, provider.name, request.model)
        except ProviderError as e:
            e.attempts = attempts
            raise
        cost = cost_usd(c.provider, c.model, c.prompt_tokens, c.completion_tokens)
        return c.model_copy(update={"attempts": attempts, "cost_usd": cost})

    async def _retry(
        self, first: ProviderError, attempt: Callable[[], Awaitable[Completion]], provider: str, model: str
    ) -> Completion:
        """Go on after a first attempt that failed, under the policy, with tenacity. The first attempt runs outside
        it because tenacity's machinery costs ~35 µs a call even when that attempt succeeds (it wraps every strategy
        at every step, with ``inspect`` checks): a quarter of a scripted completion's routing in-process (149 → 113
        µs). Tenacity's own first attempt raises that failure again, so it decides, waits, logs and counts exactly
        as if it had made it."""
        failed: ProviderError | None = first

        async def again() -> Completion:
            nonlocal failed
            if failed is not None:
                e, failed = failed, None
                raise e
            return await attempt()

        retrying = AsyncRetrying(
            stop=self._stop,
            wait=self._wait,
            retry=self._retryable,
            before_sleep=partial(_log_retry, provider, model),
            reraise=True,
        )
        c: Completion = await retrying(again)
        return c

    async def _attempt(self, provider: Provider, request: CompletionRequest) -> Completion:
        """One call that reaches a provider, under the request's deadline."""
        self.provider_calls += 1
        metrics.LLM_CALLS.labels(provider.name).inc()
        timeout = request.timeout_s or self.policy.timeout_s
        try:
            async with asyncio.timeout(timeout):
                c = await provider.complete(request)
            if request.response_schema is not None:
                conform(provider.name, request.response_schema, c.structured or {})
            return c
        except TimeoutError:
            raise ProviderError(f"{provider.name}: no answer within {timeout:g}s", retryable=True) from None
        except ProviderError:
            raise
        except Exception as e:  # a provider bug must reach the caller as a failure it can record, not a crash
            raise ProviderError(f"{provider.name}: unexpected {type(e).__name__}") from None

"""The LLM layer without Ray: the real ``openai`` and ``anthropic`` clients over HTTP against local fake servers,
driven through the router (retries, timeouts, fallback, cache, cost) the LLM actor uses."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import pickle
import time
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from structlog.testing import capture_logs

from actors.config import RuntimeConfig
from actors.llm.actor import build_router
from actors.llm.budget import BudgetExceededError
from actors.llm.cache import CompletionCache
from actors.llm.openai_provider import strict_compatible
from actors.llm.pricing import cost_usd, price_of
from actors.llm.providers import (
    AnthropicProvider,
    ChatMessage,
    Completion,
    CompletionRequest,
    OpenAICompatibleProvider,
    Provider,
    ProviderError,
    ScriptedProvider,
    ScriptRule,
    StructuredOutputError,
    build_providers,
    completed_event,
)
from actors.llm.router import LLMRouter, RetryPolicy
from cluster.settings import Settings
from tests.conftest import free_port
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.http_fake import Fault
from tests.fakes.openai_server import FakeOpenAI

KEY = "sk-test-SECRET-4242-do-not-leak"
FAST = RetryPolicy(max_attempts=4, timeout_s=5, backoff_initial_s=0.01, backoff_max_s=0.05, jitter_s=0.01)
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"valid": {"type": "boolean"}, "score": {"type": "number"}},
    "required": ["valid", "score"],
    "additionalProperties": False,
}
# Schemas OpenAI's strict mode refuses (HTTP 400), as the team's were: a map, and an object left open.
MAP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"files": {"type": "object", "additionalProperties": {"type": "string"}}},
    "required": ["files"],
    "additionalProperties": False,
}
OPEN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"tasks": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}}}}},
    "required": ["tasks"],
}


def ask(provider: str, model: str, text: str = "hello there", **kw: Any) -> CompletionRequest:
    return CompletionRequest(
        provider=provider,
        model=model,
        messages=[ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content=text)],
        temperature=0.2,
        max_tokens=64,
        **kw,
    )


def router_for(
    *,
    openai: FakeOpenAI | None = None,
    anthropic: FakeAnthropic | None = None,
    policy: RetryPolicy = FAST,
    cache: CompletionCache | None = None,
    key: str = KEY,
) -> LLMRouter:
    providers: dict[str, Provider] = {"scripted": ScriptedProvider()}
    if openai is not None:
        providers["openai"] = OpenAICompatibleProvider("openai", SecretStr(key), openai.base_url, timeout=5)
        providers["openai_compatible"] = OpenAICompatibleProvider("openai_compatible", None, openai.base_url)
    if anthropic is not None:
        providers["anthropic"] = AnthropicProvider("anthropic", SecretStr(key), anthropic.base_url, timeout=5)
    return LLMRouter(providers, policy, cache)


# ---- plain and structured completions, both wire formats ----


async def test_openai_plain_completion_with_cost() -> None:
    with FakeOpenAI(free_port(), reply="Hi! How can I help?") as fake:
        c = await router_for(openai=fake).complete(ask("openai", "gpt-4o-mini"))
    assert c.text == "Hi! How can I help?" and c.provider == "openai" and c.model == "gpt-4o-mini"
    assert (c.prompt_tokens, c.completion_tokens, c.attempts) == (4, 6, 1)
    assert c.cost_usd == pytest.approx((4 * 0.15 + 6 * 0.60) / 1e6)
    assert not c.cached and not c.fallback_used and c.structured is None
    sent = fake.requests[0]
    assert sent["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    assert sent["max_completion_tokens"] == 64 and sent["temperature"] == 0.2 and "response_format" not in sent
    assert fake.headers[0]["authorization"] == f"Bearer {KEY}"


async def test_openai_compatible_server_is_local_and_free() -> None:
    with FakeOpenAI(free_port()) as fake:
        c = await router_for(openai=fake).complete(ask("openai_compatible", "gpt-4o"))
    assert c.provider == "openai_compatible" and c.cost_usd == 0.0
    assert fake.requests[0]["max_tokens"] == 64


async def test_anthropic_plain_completion() -> None:
    with FakeAnthropic(free_port(), reply="Hello, I am Claude.") as fake:
        c = await router_for(anthropic=fake).complete(ask("anthropic", "claude-3-5-haiku-20241022"))
    assert c.text == "Hello, I am Claude." and c.provider == "anthropic"
    assert (c.prompt_tokens, c.completion_tokens) == (4, 7)
    assert c.cost_usd == pytest.approx((4 * 0.80 + 7 * 4.00) / 1e6)
    sent = fake.requests[0]
    assert sent["system"] == "be brief" and sent["messages"] == [{"role": "user", "content": "hello there"}]
    assert sent["max_tokens"] == 64 and sent["temperature"] == 0.2 and "tools" not in sent
    assert KEY in (fake.headers[0].get("x-api-key"), fake.headers[0].get("authorization", "").removeprefix("Bearer "))


async def test_openai_structured_output() -> None:
    with FakeOpenAI(free_port(), structured={"valid": True, "score": 8.5}) as fake:
        c = await router_for(openai=fake).complete(
            ask("openai", "gpt-4.1", response_schema=SCHEMA, schema_name="verdict")
        )
    assert c.structured == {"valid": True, "score": 8.5} and json.loads(c.text) == c.structured
    assert fake.requests[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True},
    }


@pytest.mark.parametrize(
    ("schema", "answer"),
    [(MAP_SCHEMA, {"files": {"a.py": "x = 1"}}), (OPEN_SCHEMA, {"tasks": [{"n": 1, "more": True}]})],
    ids=["map", "open-object"],
)
async def test_openai_sends_a_schema_strict_mode_cannot_take_as_non_strict(
    schema: dict[str, Any], answer: dict[str, Any]
) -> None:
    """Strict mode answers HTTP 400 to a map (``additionalProperties`` a schema) or an object left open: the team's
    schemas never worked on OpenAI while every schema was sent strict."""
    with FakeOpenAI(free_port(), structured=answer) as fake:
        c = await router_for(openai=fake).complete(ask("openai", "gpt-4.1", response_schema=schema))
    assert c.structured == answer
    assert fake.requests[0]["response_format"]["json_schema"] == {"name": "answer", "schema": schema, "strict": False}


def test_strict_compatible_schemas() -> None:
    closed = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    closed["additionalProperties"] = False
    assert strict_compatible(SCHEMA) and strict_compatible(closed)
    assert not strict_compatible(MAP_SCHEMA) and not strict_compatible(OPEN_SCHEMA)
    assert not strict_compatible({**closed, "required": []})  # every property must be required
    assert not strict_compatible({k: v for k, v in closed.items() if k != "additionalProperties"})
    assert not strict_compatible({"type": "array", "items": closed})  # the root must be an object
    nested = {**closed, "properties": {"n": {"type": "array", "items": {"type": "object", "properties": {}}}}}
    assert not strict_compatible(nested)  # an open object inside an array
    assert strict_compatible({**closed, "properties": {"n": {"type": "array", "items": {**closed}}}})
    union = {**closed, "properties": {"n": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/open"}]}}}
    assert strict_compatible({**union, "$defs": {"open": closed}})
    assert not strict_compatible({**union, "$defs": {"open": {"type": "object"}}})
    assert not strict_compatible({**closed, "properties": {"n": {"allOf": [closed]}}})  # strict mode has no allOf


async def test_anthropic_gets_a_history_that_starts_with_a_user_turn() -> None:
    """A chat trimmed to its bound starts with the assistant's reply to a message trimmed away; the messages API
    answers a first assistant turn with 400."""
    roles = ["assistant", "user", "assistant", "user"]
    history = [ChatMessage(role=r, content=f"{r} {i}") for i, r in enumerate(roles)]
    request = ask("anthropic", "claude-3-5-haiku").model_copy(
        update={"messages": [ChatMessage(role="system", content="be brief"), *history]}
    )
    with FakeAnthropic(free_port()) as fake:
        await router_for(anthropic=fake).complete(request)
    assert fake.requests[0]["messages"] == [
        {"role": "user", "content": "user 1"},
        {"role": "assistant", "content": "assistant 2"},
        {"role": "user", "content": "user 3"},
    ]


async def test_anthropic_structured_output_is_a_forced_tool_call() -> None:
    with FakeAnthropic(free_port(), structured={"valid": False, "score": 3}) as fake:
        c = await router_for(anthropic=fake).complete(
            ask("anthropic", "claude-sonnet-4-20250514", response_schema=SCHEMA, schema_name="verdict")
        )
    assert c.structured == {"valid": False, "score": 3} and json.loads(c.text) == c.structured
    sent = fake.requests[0]
    assert sent["tool_choice"] == {"type": "tool", "name": "verdict"}
    assert [(t["name"], t["input_schema"]) for t in sent["tools"]] == [("verdict", SCHEMA)]


async def test_malformed_structured_json_fails_without_retry() -> None:
    with (
        FakeOpenAI(free_port(), raw_structured='{"valid": true, "score": ') as fake,
        pytest.raises(StructuredOutputError, match="not valid JSON") as err,
    ):
        await router_for(openai=fake).complete(ask("openai", "gpt-4o", response_schema=SCHEMA))
    assert fake.hits == 1 and err.value.attempts == 1 and not err.value.retryable


async def test_structured_answer_that_is_not_an_object_fails() -> None:
    with (
        FakeOpenAI(free_port(), raw_structured="[1, 2]") as fake,
        pytest.raises(StructuredOutputError, match="not a JSON object"),
    ):
        await router_for(openai=fake).complete(ask("openai", "gpt-4o", response_schema=SCHEMA))


async def test_structured_answer_that_breaks_the_schema_fails_without_retry() -> None:
    with (
        FakeOpenAI(free_port(), structured={"valid": "yes", "score": 8}) as fake,
        pytest.raises(StructuredOutputError, match="does not match the schema at valid: 'yes' is not of type") as err,
    ):
        await router_for(openai=fake).complete(ask("openai", "gpt-4o", response_schema=SCHEMA))
    assert fake.hits == 1 and not err.value.retryable
    with (
        FakeAnthropic(free_port(), structured={"valid": True}) as fake,
        pytest.raises(StructuredOutputError, match="'score' is a required property"),
    ):
        await router_for(anthropic=fake).complete(ask("anthropic", "claude-3-5-haiku", response_schema=SCHEMA))


async def test_anthropic_malformed_tool_input_fails_without_retry() -> None:
    with (
        FakeAnthropic(free_port(), raw_input='{"valid": tru') as fake,
        pytest.raises(StructuredOutputError, match="not valid JSON"),
    ):
        await router_for(anthropic=fake).complete(ask("anthropic", "claude-3-5-haiku", response_schema=SCHEMA))
    assert fake.hits == 1


# ---- retries, timeouts and fallback ----


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_429_honours_retry_after_then_succeeds(kind: str) -> None:
    fake: FakeOpenAI | FakeAnthropic = FakeOpenAI(free_port()) if kind == "openai" else FakeAnthropic(free_port())
    fake.fail(429, headers={"retry-after": "1"})
    with fake:
        router = router_for(**{kind: fake})  # type: ignore[arg-type]
        started = time.monotonic()
        c = await router.complete(ask(kind, "gpt-4o" if kind == "openai" else "claude-3-5-haiku"))
        elapsed = time.monotonic() - started
    assert c.attempts == 2 and fake.hits == 2 and router.provider_calls == 2
    assert elapsed >= 1.0  # the backoff alone would have waited ~10 ms


async def test_retry_after_is_capped() -> None:
    policy = FAST.model_copy(update={"retry_after_cap_s": 0.1})
    with FakeOpenAI(free_port()) as fake:
        fake.fail(429, headers={"retry-after": "3600"})
        started = time.monotonic()
        c = await router_for(openai=fake, policy=policy).complete(ask("openai", "gpt-4o"))
    assert c.attempts == 2 and time.monotonic() - started < 2


async def test_500_twice_then_success() -> None:
    with FakeOpenAI(free_port(), reply="third time lucky") as fake, capture_logs() as logs:
        fake.fail(500, times=2)
        c = await router_for(openai=fake).complete(ask("openai", "gpt-4o"))
    assert c.text == "third time lucky" and c.attempts == 3 and fake.hits == 3
    assert [e["attempt"] for e in logs if e["event"] == "llm.retry"] == [1, 2]


async def test_persistent_500_gives_up_after_max_attempts() -> None:
    with FakeAnthropic(free_port()) as fake:
        fake.always = Fault(status=529)
        router = router_for(anthropic=fake)
        with pytest.raises(ProviderError, match="HTTP 529") as err:
            await router.complete(ask("anthropic", "claude-3-5-haiku", agent_id="qa"))
    assert fake.hits == 4 and err.value.attempts == 4 and err.value.status == 529
    assert router.usage()["agents"]["qa"]["failures"] == 1


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_other_4xx_is_not_retried(status: int) -> None:
    with FakeOpenAI(free_port()) as fake:
        fake.fail(status)
        with pytest.raises(ProviderError, match=f"HTTP {status}") as err:
            await router_for(openai=fake).complete(ask("openai", "gpt-4o"))
    assert fake.hits == 1 and err.value.attempts == 1 and not err.value.retryable


async def test_timeout_is_retried_then_fails() -> None:
    policy = FAST.model_copy(update={"max_attempts": 2, "timeout_s": 0.3})
    with FakeOpenAI(free_port()) as fake:
        fake.delay_s = 3
        started = time.monotonic()
        with pytest.raises(ProviderError, match=r"no answer within 0\.3s") as err:
            await router_for(openai=fake, policy=policy).complete(ask("openai", "gpt-4o"))
        elapsed = time.monotonic() - started
    assert fake.hits == 2 and err.value.attempts == 2 and elapsed < 2


async def test_request_timeout_overrides_the_default_and_a_slow_first_answer_is_retried() -> None:
    with FakeAnthropic(free_port(), reply="on time") as fake:
        fake.fail(delay_s=3)  # only the first answer is slow
        c = await router_for(anthropic=fake).complete(ask("anthropic", "claude-3-5-haiku", timeout_s=0.3))
    assert c.text == "on time" and c.attempts == 2


async def test_connection_refused_is_retried_then_fails() -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    router = LLMRouter({"openai_compatible": OpenAICompatibleProvider("openai_compatible", None, dead)}, FAST)
    with pytest.raises(ProviderError, match="connection failed") as err:
        await router.complete(ask("openai_compatible", "llama-3-8b"))
    assert err.value.attempts == 4 and err.value.retryable


async def test_fallback_provider_answers_when_the_primary_keeps_failing() -> None:
    with FakeOpenAI(free_port()) as primary, FakeAnthropic(free_port(), reply="from the fallback") as backup:
        primary.always = Fault(status=503)
        router = router_for(openai=primary, anthropic=backup)
        req = ask("openai", "gpt-4o", fallback_provider="anthropic", fallback_model="claude-3-5-haiku")
        c = await router.complete(req)
    assert c.fallback_used and c.provider == "anthropic" and c.model == "claude-3-5-haiku"
    assert c.text == "from the fallback" and c.attempts == 5 and primary.hits == 4 and backup.hits == 1
    assert c.cost_usd == pytest.approx(cost_usd("anthropic", "claude-3-5-haiku", c.prompt_tokens, c.completion_tokens))


async def test_fallback_model_on_the_same_provider() -> None:
    with FakeOpenAI(free_port()) as fake:
        fake.fail(400)  # the primary model is rejected; the same server serves the fallback model
        c = await router_for(openai=fake).complete(ask("openai", "gpt-5", fallback_model="gpt-4o-mini"))
    assert c.fallback_used and c.model == "gpt-4o-mini" and c.attempts == 2
    assert [r["model"] for r in fake.requests] == ["gpt-5", "gpt-4o-mini"]


async def test_when_the_fallback_fails_too_both_errors_are_reported() -> None:
    with FakeOpenAI(free_port()) as primary, FakeAnthropic(free_port()) as backup:
        primary.always = Fault(status=500)
        backup.always = Fault(status=500)
        with pytest.raises(ProviderError, match=r"openai: HTTP 500.*fallback anthropic/claude-3-5-haiku") as err:
            await router_for(openai=primary, anthropic=backup).complete(
                ask("openai", "gpt-4o", fallback_provider="anthropic", fallback_model="claude-3-5-haiku")
            )
    assert err.value.attempts == 8


async def test_unknown_provider_and_provider_bugs_are_provider_errors() -> None:
    class Broken:
        name = "broken"

        async def complete(self, request: CompletionRequest) -> Completion:
            raise KeyError("oops")

    router = LLMRouter({"broken": Broken()}, FAST)
    with pytest.raises(ProviderError, match="unknown provider 'nope'"):
        await router.complete(ask("nope", "m"))
    with pytest.raises(ProviderError, match="broken: unexpected KeyError") as err:
        await router.complete(ask("broken", "m"))
    assert err.value.attempts == 1


def test_provider_error_survives_pickling() -> None:
    e = pickle.loads(pickle.dumps(ProviderError("x: HTTP 429", retryable=True, status=429, retry_after_s=1.5)))
    assert (str(e), e.retryable, e.status, e.retry_after_s) == ("x: HTTP 429", True, 429, 1.5)
    s = pickle.loads(pickle.dumps(StructuredOutputError("bad json")))
    assert isinstance(s, StructuredOutputError) and isinstance(s, ProviderError) and not s.retryable


# ---- cache ----


async def test_cache_hit_does_not_reach_the_provider() -> None:
    with FakeOpenAI(free_port()) as fake:
        router = router_for(openai=fake, cache=CompletionCache(ttl_s=60))
        first = await router.complete(ask("openai", "gpt-4o", agent_id="a"))
        again = await router.complete(ask("openai", "gpt-4o", agent_id="b", timeout_s=9))  # same question
        assert fake.hits == 1 and router.provider_calls == 1
        assert again.cached and not first.cached and again.text == first.text
        assert again.latency_ms == 0 and again.cost_usd == 0 and again.attempts == 0 and first.cost_usd > 0
        bypass = await router.complete(ask("openai", "gpt-4o", cache=False))
        assert not bypass.cached and fake.hits == 2
        other = await router.complete(ask("openai", "gpt-4o", text="something else"))
        assert not other.cached and fake.hits == 3
    usage = router.usage()
    assert usage["agents"]["a"]["completions"] == 1 and usage["agents"]["b"]["cached"] == 1
    assert usage["agents"]["b"]["cost_usd"] == 0 and usage["cache"]["hits"] == 1


async def test_cache_entries_expire_after_the_ttl() -> None:
    now = [1000.0]
    with FakeAnthropic(free_port()) as fake:
        router = router_for(anthropic=fake, cache=CompletionCache(ttl_s=10, clock=lambda: now[0]))
        await router.complete(ask("anthropic", "claude-3-5-haiku"))
        now[0] += 9.9
        assert (await router.complete(ask("anthropic", "claude-3-5-haiku"))).cached
        now[0] += 0.2
        assert not (await router.complete(ask("anthropic", "claude-3-5-haiku"))).cached
    assert fake.hits == 2


async def test_cache_with_a_tiny_real_ttl() -> None:
    router = LLMRouter({"scripted": ScriptedProvider()}, FAST, CompletionCache(ttl_s=0.3))
    await router.complete(ask("scripted", "m"))
    assert (await router.complete(ask("scripted", "m"))).cached  # unless this machine stalled for 0.3 s
    await asyncio.sleep(0.35)
    assert not (await router.complete(ask("scripted", "m"))).cached
    assert router.provider_calls == 2


def test_cache_is_lru_bounded() -> None:
    cache = CompletionCache(ttl_s=60, max_entries=2)
    c = Completion(text="t", provider="p", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1)
    cache.put("a", c)
    cache.put("b", c)
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", c)
    assert len(cache) == 2 and cache.get("b") is None and cache.get("a") is not None


async def test_failures_are_not_cached() -> None:
    with FakeOpenAI(free_port()) as fake:
        fake.fail(400)
        router = router_for(openai=fake, cache=CompletionCache())
        with pytest.raises(ProviderError):
            await router.complete(ask("openai", "gpt-4o"))
        assert not (await router.complete(ask("openai", "gpt-4o"))).cached


# ---- cost and usage ----


def test_pricing_table() -> None:
    assert price_of("gpt-4o") == price_of("gpt-4o-2024-08-06")
    assert price_of("gpt-4o-mini-2024-07-18") == price_of("gpt-4o-mini") != price_of("gpt-4o")
    assert price_of("claude-3-5-sonnet-20241022") == price_of("claude-sonnet-4-20250514")
    assert price_of("openai/gpt-4.1-mini") == price_of("gpt-4.1-mini")
    assert price_of("llama-3-8b") is None and price_of("gpt-4o2") is None
    assert cost_usd("openai", "gpt-4o", 1_000_000, 1_000_000) == pytest.approx(12.5)
    assert cost_usd("anthropic", "claude-3-5-haiku-latest", 2_000, 1_000) == pytest.approx(0.0056)
    assert cost_usd("openai", "o4-mini", 1000, 500) == pytest.approx((1000 * 1.10 + 500 * 4.40) / 1e6)
    assert cost_usd("openai_compatible", "gpt-4o", 1000, 1000) == 0.0
    assert cost_usd("scripted", "scripted", 1000, 1000) == 0.0


def test_current_models_are_priced_by_their_own_entry_or_family() -> None:
    """Unpriced, a model cost 0 and no budget set on it ever ran out."""
    assert price_of("gpt-5.1") == price_of("gpt-5.1-2025-11-13") == price_of("gpt-5") is not None
    assert price_of("o1") == price_of("o1-2024-12-17") != price_of("o1-mini-2024-09-12") is not None
    assert price_of("o1-pro") is not None and price_of("o3-pro") != price_of("o3")
    assert price_of("gpt-4-turbo-2024-04-09") == price_of("gpt-4-turbo") is not None
    assert price_of("chatgpt-4o-latest") is not None
    assert price_of("claude-3-opus-20240229") == price_of("claude-opus-4-1-20250805")
    assert price_of("claude-sonnet-4-5@20250929") == price_of("claude-sonnet-4-5")  # Vertex AI's spelling
    assert price_of("gpt-5.2") is None and price_of("o1x") is None  # another point version, not a suffix
    # a smaller model named after its family is not priced as the family
    assert price_of("gpt-5.1-codex-mini") == price_of("gpt-5-mini") != price_of("gpt-5.1-codex") == price_of("gpt-5.1")
    assert price_of("codex-mini-latest") is not None


def test_a_paid_model_with_no_price_is_reported_once() -> None:
    with capture_logs() as logs:
        assert cost_usd("openai", "gpt-unlisted-7", 1000, 1000) == 0.0
        cost_usd("openai", "gpt-unlisted-7", 1000, 1000)
        cost_usd("openai_compatible", "llama-3-8b", 1000, 1000)  # self-hosted: free, nothing to report
        cost_usd("scripted", "scripted", 1000, 1000)
    assert [(e["event"], e["log_level"], e["model"]) for e in logs] == [
        ("llm.model_unpriced", "warning", "gpt-unlisted-7")
    ]


async def test_usage_is_kept_per_agent() -> None:
    router = LLMRouter({"scripted": ScriptedProvider()}, FAST)
    await router.complete(ask("scripted", "gpt-4o-mini", agent_id="cfo"))
    await router.complete(ask("scripted", "gpt-4o-mini", text="two", agent_id="cfo"))
    await router.complete(ask("scripted", "claude-opus-4", agent_id="legal"))
    await router.complete(ask("scripted", "scripted"))
    usage = router.usage()
    cfo, legal = usage["agents"]["cfo"], usage["agents"]["legal"]
    assert cfo["completions"] == 2 and cfo["attempts"] == 2 and cfo["cost_usd"] > 0
    assert legal["cost_usd"] > cfo["cost_usd"] and usage["agents"]["unattributed"]["cost_usd"] == 0
    assert usage["total"]["completions"] == 4 and usage["provider_calls"] == 4
    assert usage["total"]["cost_usd"] == pytest.approx(cfo["cost_usd"] + legal["cost_usd"])


# ---- secrets ----


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_api_key_never_leaks(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    fake: FakeOpenAI | FakeAnthropic = (
        FakeOpenAI(free_port(), api_key="the-right-key")
        if kind == "openai"
        else FakeAnthropic(free_port(), api_key="the-right-key")
    )
    caplog.set_level(logging.DEBUG)
    with fake, capture_logs() as logs:
        router = router_for(**{kind: fake})  # type: ignore[arg-type]
        with pytest.raises(ProviderError, match="HTTP 401") as err:
            await router.complete(ask(kind, "gpt-4o", fallback_model="gpt-4o-mini"))
    assert fake.hits == 2 and err.value.attempts == 2  # not retried; the fallback model is tried once
    assert "[redacted]" in str(err.value)  # the server echoed the key back; it was scrubbed
    texts = [str(err.value), repr(err.value), caplog.text, repr(logs), repr(router.providers)]
    assert all(KEY not in t for t in texts)


def test_keys_stay_secret_in_config_and_providers() -> None:
    config = RuntimeConfig(database_url="postgresql://x", openai_api_key=KEY, anthropic_api_key=KEY)
    providers = build_providers(config)
    assert set(providers) == {"scripted", "openai", "openai_compatible", "anthropic"}
    assert KEY not in repr(config) and KEY not in str(config.model_dump()) and KEY not in repr(providers)
    assert KEY not in repr(Settings(anthropic_api_key=KEY, openai_api_key=KEY))


async def test_anthropic_without_a_key_says_so() -> None:
    router = LLMRouter({"anthropic": AnthropicProvider("anthropic")}, FAST)
    with pytest.raises(ProviderError, match="no API key configured") as err:
        await router.complete(ask("anthropic", "claude-3-5-haiku"))
    assert err.value.attempts == 1


def test_settings_and_runtime_config_share_the_llm_fields() -> None:
    fields = {"anthropic_api_key", "anthropic_base_url", "llm_timeout_s", "llm_max_attempts", "llm_cache_ttl_s"}
    assert fields <= set(RuntimeConfig.model_fields) & set(Settings.model_fields)
    router = build_router(
        RuntimeConfig(database_url="postgresql://x", llm_max_attempts=2, llm_timeout_s=7, llm_cache_ttl_s=5)
    )
    assert (router.policy.max_attempts, router.policy.timeout_s) == (2, 7)
    assert router.cache is not None and router.cache.ttl_s == 5 and router.cache.max_entries == 10_000


# ---- the scripted provider ----


def convo(system: str, *users: str) -> list[ChatMessage]:
    out = [ChatMessage(role="system", content=system)]
    for u in users:
        out += [ChatMessage(role="user", content=u), ChatMessage(role="assistant", content="ok")]
    return out[:-1]


async def test_scripted_rules_match_the_last_user_message_first() -> None:
    p = ScriptedProvider(
        [
            ScriptRule(pattern=r"PHASE=review", structured={"approved": True}),
            ScriptRule(pattern=r"ROLE=cfo", text="I am the CFO"),
            ScriptRule(pattern=r"price.*\n.*list", text="multi-line match"),
        ]
    )
    review = await p.complete(
        CompletionRequest(provider="scripted", model="m", messages=convo("ROLE=cfo", "PHASE=review"))
    )
    assert review.structured == {"approved": True} and json.loads(review.text) == {"approved": True}
    cfo = await p.complete(CompletionRequest(provider="scripted", model="m", messages=convo("ROLE=cfo", "hi")))
    assert cfo.text == "I am the CFO" and cfo.structured is None
    multi = await p.complete(CompletionRequest(provider="scripted", model="m", messages=convo("s", "price\nlist")))
    assert multi.text == "multi-line match"
    # only the last user message counts
    old = await p.complete(CompletionRequest(provider="scripted", model="m", messages=convo("s", "PHASE=review", "x")))
    assert old.text == "[m] turn 2: you said 'x'"


async def test_scripted_without_a_match_keeps_the_turn_echo() -> None:
    p = ScriptedProvider([ScriptRule(pattern="never", text="no")])
    c = await p.complete(CompletionRequest(provider="scripted", model="scripted", messages=convo("s", "a", "b")))
    assert c.text == "[scripted] turn 2: you said 'b'" and c.structured is None
    assert c.prompt_tokens == 4 and c.completion_tokens == len(c.text.split())
    plain = await ScriptedProvider().complete(
        CompletionRequest(provider="scripted", model="x", messages=convo("s", "hello"))
    )
    assert plain.text == "[x] turn 1: you said 'hello'"


async def test_scripted_schema_requests() -> None:
    p = ScriptedProvider(
        [ScriptRule(pattern="json please", text='{"valid": true}'), ScriptRule(pattern="prose", text="no")]
    )
    none = await p.complete(ask("scripted", "m", text="nothing matches", response_schema=SCHEMA))
    assert none.structured == {}
    parsed = await p.complete(ask("scripted", "m", text="json please", response_schema=SCHEMA))
    assert parsed.structured == {"valid": True}
    with pytest.raises(StructuredOutputError):
        await p.complete(ask("scripted", "m", text="prose", response_schema=SCHEMA))


def test_script_rules_are_validated() -> None:
    with pytest.raises(ValidationError, match="regex"):
        ScriptRule(pattern="(unclosed", text="x")
    with pytest.raises(ValidationError, match="text or structured"):
        ScriptRule(pattern="x")


async def test_named_scripts_are_providers() -> None:
    router = LLMRouter({"scripted": ScriptedProvider()}, FAST, CompletionCache())
    schema = {"type": "object"}  # an unmatched scripted request answers {}
    assert router.set_script("team", [ScriptRule(pattern="PHASE=tests", structured={"files": {}})]) == "scripted:team"
    c = await router.complete(ask("scripted:team", "gpt-4o-mini", text="PHASE=tests go", response_schema=schema))
    assert c.structured == {"files": {}} and c.provider == "scripted:team"
    plain = await router.complete(ask("scripted", "gpt-4o-mini", text="PHASE=tests go", response_schema=schema))
    assert plain.structured == {} and not plain.cached  # the provider string is part of what was asked
    router.set_script("team", [ScriptRule(pattern="PHASE=tests", structured={"files": {"a.py": ""}})])
    again = await router.complete(ask("scripted:team", "gpt-4o-mini", text="PHASE=tests go", response_schema=schema))
    assert again.structured == {"files": {"a.py": ""}} and not again.cached
    with pytest.raises(ProviderError, match="set_script"):
        await router.complete(ask("scripted:nope", "m"))


# ---- the digest ----


def test_digest_is_what_was_asked() -> None:
    base = ask("openai", "gpt-4o")
    legacy = {
        k: v
        for k, v in base.model_dump(mode="json").items()
        if k in {"provider", "model", "messages", "temperature", "max_tokens", "base_url"}
    }
    assert base.digest() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:32]
    same = ask(
        "openai",
        "gpt-4o",
        cache=False,
        timeout_s=3,
        fallback_provider="anthropic",
        fallback_model="claude-3-5-haiku",
        agent_id="a",
        run_id="r",
    )
    assert same.digest() == base.digest()
    assert ask("anthropic", "gpt-4o").digest() != base.digest()
    assert ask("scripted:a", "gpt-4o").digest() != ask("scripted:b", "gpt-4o").digest()
    structured = ask("openai", "gpt-4o", response_schema=SCHEMA)
    assert structured.digest() != base.digest()
    assert ask("openai", "gpt-4o", response_schema=SCHEMA, schema_name="v").digest() != structured.digest()
    assert ask("openai", "gpt-4o", schema_name="ignored without a schema").digest() == base.digest()


def whole_dump_digest(request: CompletionRequest) -> str:
    """The digest as it was first written: the whole request dumped at once (recorded logs hold these)."""
    asked = request.model_dump(mode="json", exclude={"cache", "timeout_s", "fallback_provider", "fallback_model"})
    for k in ("agent_id", "run_id", "record_key", "api_key"):
        asked.pop(k, None)
    if request.response_schema is None:
        del asked["response_schema"], asked["schema_name"]
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:32]


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"base_url": "\0messages"},  # a value that is the digest's own stand-in for the messages
        {"response_schema": {"\0messages": {"type": "string"}}, "schema_name": "\0messages"},
        {"messages": []},
    ],
)
def test_digest_matches_the_whole_request_dumped(changes: dict[str, object]) -> None:
    """The digest joins each message's cached JSON instead of dumping the history on every request; it must stay
    byte-for-byte what dumping the whole request gives, or recorded completions stop matching on replay."""
    messages = [
        ChatMessage(role="system", content='be "brief"\n\tand kind'),
        ChatMessage(role="user", content="Привет, 你好 \0messages \\u0000messages"),
        ChatMessage(role="assistant", content=""),
    ]
    request = CompletionRequest(provider="openai", model="gpt-4o", messages=messages).model_copy(update=changes)
    assert request.digest() == whole_dump_digest(request)
    assert request.digest() == request.digest()  # the cached parts give the same text again
    other = request.model_copy(update={"messages": [*request.messages, ChatMessage(role="user", content="x")]})
    assert other.digest() == whole_dump_digest(other) != request.digest()


# ---- a cached answer its recorder never recorded, budget errors across Ray, keys per base URL ----


async def test_a_cached_answer_its_recorder_never_recorded_keeps_its_cost() -> None:
    """A decision retried after a version conflict asks again; the answer it paid for was never recorded, so the
    cached answer must carry that cost into the log. Anyone else reusing the answer paid nothing more."""
    with FakeOpenAI(free_port()) as fake:
        router = router_for(openai=fake, cache=CompletionCache(ttl_s=60))
        paid = await router.complete(ask("openai", "gpt-4o", record_key="task-r1.t1:work:1"))
        again = await router.complete(ask("openai", "gpt-4o", record_key="task-r1.t1:work:1"))
        other = await router.complete(ask("openai", "gpt-4o", record_key="task-r1.t2:work:1"))
        anonymous = await router.complete(ask("openai", "gpt-4o"))
    assert fake.hits == 1 and paid.cost_usd > 0 and not paid.cached
    assert again.cached and again.cost_usd == paid.cost_usd and again.attempts == 0
    assert (again.prompt_tokens, again.completion_tokens) == (paid.prompt_tokens, paid.completion_tokens)
    assert other.cached and other.cost_usd == 0 and anonymous.cached and anonymous.cost_usd == 0
    assert router.usage()["total"]["cost_usd"] == pytest.approx(paid.cost_usd)  # paid once, counted once
    request = ask("openai", "gpt-4o", record_key="task-r1.t1:work:1")
    recorded = completed_event(again, request, "cfo")
    assert recorded.cached and recorded.cost_usd == paid.cost_usd  # the record says it was a cache hit
    assert request.digest() == ask("openai", "gpt-4o").digest()  # who records is not what was asked


def test_budget_error_survives_pickling() -> None:
    """It crosses Ray (a voter's verdict, the LLM actor's answer); Ray could not rebuild it from its message."""
    e = pickle.loads(pickle.dumps(BudgetExceededError("run", 1.5, 1.0)))
    assert isinstance(e, BudgetExceededError) and isinstance(e, ProviderError)
    assert (e.scope, e.spent, e.budget) == ("run", 1.5, 1.0) and str(
        e
    ) == "run budget exceeded: spent $1.5000 of $1.0000"


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_the_server_key_goes_only_to_its_configured_base_url(kind: str) -> None:
    """An agent's own base_url must not receive the server's key: refused, unless the request has its own key."""
    own = "sk-agent-own-key-1234"
    server: FakeOpenAI | FakeAnthropic = FakeOpenAI(free_port()) if kind == "openai" else FakeAnthropic(free_port())
    elsewhere: FakeOpenAI | FakeAnthropic = (
        FakeOpenAI(free_port(), api_key=own) if kind == "openai" else FakeAnthropic(free_port(), api_key=own)
    )
    with server, elsewhere:
        router = router_for(**{kind: server})  # type: ignore[arg-type]
        assert (await router.complete(ask(kind, "gpt-4o"))).text  # the configured server gets the key
        with pytest.raises(ProviderError, match="is not the configured") as err:
            await router.complete(ask(kind, "gpt-4o", base_url=elsewhere.base_url))
        assert elsewhere.hits == 0 and KEY not in str(err.value)
        mine = await router.complete(ask(kind, "gpt-4o", base_url=elsewhere.base_url, api_key=SecretStr(own)))
        assert mine.text and elsewhere.hits == 1  # with its own key (which it checks) it is asked
        request = ask(kind, "gpt-4o", base_url=elsewhere.base_url, api_key=SecretStr(own))
        assert own not in request.model_dump_json() and own not in repr(request)  # never serialized, never logged


async def test_openai_compatible_never_sends_the_server_openai_key() -> None:
    with FakeOpenAI(free_port()) as fake:
        config = RuntimeConfig(database_url="postgresql://x", openai_api_key=KEY)
        router = LLMRouter(build_providers(config), FAST)
        await router.complete(ask("openai_compatible", "llama-3-8b", base_url=fake.base_url))
    assert fake.hits == 1 and KEY not in str(fake.headers)

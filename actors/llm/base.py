"""The shared vocabulary of the LLM layer: requests, completions, errors and the provider interface.

Kept free of SDK imports so every provider module (and the callers that only build requests) can import it."""

from __future__ import annotations

import email.utils
import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from functools import cached_property, lru_cache
from operator import attrgetter
from typing import Any, Generic, Protocol, TypeVar

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from events.pickling import PickledAsJson

# Fields that say how to ask, not what was asked: they never change the answer, so they stay out of the digest
# (a replay or a cache lookup must match a request whatever its timeout, fallback or accounting tags).
_NOT_ASKED = {
    "cache",
    "timeout_s",
    "fallback_provider",
    "fallback_model",
    "agent_id",
    "run_id",
    "record_key",
    "api_key",
}


# Stands in for the messages in the digest's JSON until their cached parts replace it (unless a value is this very
# string: then the request is dumped whole).
_MESSAGES = "\0messages"
_MESSAGES_JSON = json.dumps(_MESSAGES)
_ASKED = attrgetter("asked")  # ``map`` with it joins a long history at about twice a generator's speed


class ChatMessage(BaseModel):
    """Frozen, because a chat resends the same messages with every request and caches their digest part."""

    model_config = ConfigDict(frozen=True)

    role: str
    content: str

    @cached_property
    def asked(self) -> str:
        """This message as the request's digest writes it (``json.dumps`` with sorted keys)."""
        return json.dumps({"content": self.content, "role": self.role})

    @cached_property
    def tokens(self) -> int:
        """``count_tokens`` of the content, counted once however often the message is resent."""
        return count_tokens(self.content)


class CompletionRequest(PickledAsJson):
    provider: str
    model: str
    messages: list[ChatMessage]
    temperature: float = 0.7
    max_tokens: int = 512
    base_url: str | None = None
    response_schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    fallback_provider: str | None = None
    fallback_model: str | None = None
    timeout_s: float | None = None
    cache: bool = True
    agent_id: str | None = None
    run_id: str | None = None
    # Who will record the answer, e.g. ``task-<id>:work:2`` or a chat message's id: the same key asking again means
    # its earlier answer was never recorded (a caller asks only for what its log lacks), so a cached answer then
    # still carries the cost it was paid for (LLMRouter.complete).
    record_key: str | None = None
    # A key for ``base_url`` of this request only (an agent's own server). Never hashed, never serialized: it does
    # not cross Ray, and it is never in an event.
    api_key: SecretStr | None = Field(None, exclude=True, repr=False)

    def digest(self) -> str:
        """Stable hash of what was asked: recorded with the completion, used to match it on replay and in the cache.

        A request without a schema hashes exactly as it did before structured output existed, so logs recorded
        then still replay."""
        asked = self.model_dump(mode="json", exclude=_NOT_ASKED | {"messages"})
        if self.response_schema is None:
            del asked["response_schema"], asked["schema_name"]
        # the same text as dumping the whole request, without dumping the history again for every reply
        asked["messages"] = _MESSAGES
        text = json.dumps(asked, sort_keys=True)
        if text.count(_MESSAGES_JSON) == 1:
            text = text.replace(_MESSAGES_JSON, "[" + ", ".join(map(_ASKED, self.messages)) + "]")
        else:  # another value is the stand-in itself
            asked["messages"] = [m.model_dump() for m in self.messages]
            text = json.dumps(asked, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def last_user_message(self) -> str:
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")

    def system_prompt(self) -> str:
        return "\n\n".join(m.content for m in self.messages if m.role == "system")


class Completion(PickledAsJson):
    text: str
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float = Field(ge=0)
    cost_usd: float = 0.0
    structured: dict[str, Any] | None = None
    cached: bool = False
    attempts: int = Field(1, ge=0)
    fallback_used: bool = False
    request_hash: str | None = None  # the request's digest, set by the router: hashing a long history costs ~0.1 ms

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ProviderError(Exception):
    """The provider failed; the caller records a failure event instead of a completion.

    ``retryable`` says whether asking again may help (rate limits, 5xx, timeouts, lost connections); the message
    never holds an API key. Only the message travels in ``args``, so the error pickles across Ray intact."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        retry_after_s: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s
        self.attempts = attempts


class StructuredOutputError(ProviderError):
    """The model answered, but not with the JSON object the schema asked for; asking the same again won't help."""


class Provider(Protocol):
    name: str

    async def complete(self, request: CompletionRequest) -> Completion: ...


@lru_cache(maxsize=16384)  # a chat's history is counted again for every reply
def count_tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: words and punctuation runs."""
    return max(1, len(text.split()))


def elapsed_ms(started: float) -> float:
    return max(0.0, (time.perf_counter() - started) * 1000)


def secret_value(key: SecretStr | str | None) -> str | None:
    if isinstance(key, SecretStr):
        return key.get_secret_value() or None
    return key or None


def server_key_for(
    provider: str, configured_url: str | None, key: str | None, request: CompletionRequest
) -> str | None:
    """The API key to send for ``request``: its own key if it has one; the server's key (``key``) only to the
    server's configured base URL. Another base URL (an agent's own) with no key of its own is refused when the
    server has a key, so that key never reaches a host it was not configured for."""
    own = secret_value(request.api_key)
    if own:
        return own
    if request.base_url is None or request.base_url.rstrip("/") == (configured_url or "").rstrip("/"):
        return key
    if key:
        configured = configured_url or "the provider's default"
        raise ProviderError(
            f"{provider}: base_url {request.base_url} is not the configured {configured}; the server's API key "
            "is only sent there. Give the agent its own API key for that server, or use the openai_compatible "
            "provider for a server that needs none"
        )
    return None


Client = TypeVar("Client")


class SdkProvider(Generic[Client]):
    """What the providers on a vendor's SDK share: the server's key kept as a secret, and one SDK client per base
    URL and key, made on first use and reused (a client holds a connection pool)."""

    def __init__(
        self, name: str, api_key: SecretStr | str | None = None, base_url: str | None = None, timeout: float = 60.0
    ) -> None:
        self.name = name
        key = secret_value(api_key)
        self._key = SecretStr(key) if key else None
        self.base_url = base_url
        self.timeout = timeout
        self._clients: dict[tuple[str | None, str], Client] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, base_url={self.base_url!r})"

    def _key_for(self, request: CompletionRequest) -> str | None:
        return server_key_for(self.name, self.base_url, secret_value(self._key), request)

    def _secrets(self, request: CompletionRequest) -> list[str | None]:
        """What an error from the SDK must not repeat."""
        return [secret_value(self._key), secret_value(request.api_key)]

    def _client_for(self, url: str | None, key: str) -> Client:
        slot = (url, hashlib.sha256(key.encode()).hexdigest())  # the key itself is not kept beside the client
        if slot not in self._clients:
            self._clients[slot] = self._new_client(url, key)
        return self._clients[slot]

    def _new_client(self, url: str | None, key: str) -> Client:
        raise NotImplementedError


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Servers echo keys back in error bodies ("Incorrect API key provided: sk-…"): strip them before the text
    reaches an exception, a log line or an event."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "[redacted]")
    return text


def parse_structured(provider: str, text: str, *, truncated: bool = False) -> dict[str, Any]:
    """The JSON object in a structured answer, or a ``StructuredOutputError`` that says what was wrong with it."""
    hint = " (the answer was cut off at max_tokens)" if truncated else ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise StructuredOutputError(
            f"{provider}: the structured answer is not valid JSON{hint}: {e.msg} at line {e.lineno} column {e.colno}; "
            f"got {text[:200]!r}"
        ) from None
    if not isinstance(value, dict):
        raise StructuredOutputError(
            f"{provider}: the structured answer is {type(value).__name__}, not a JSON object{hint}; got {text[:200]!r}"
        )
    return value


def conform(provider: str, schema: dict[str, Any], value: dict[str, Any]) -> None:
    """A ``StructuredOutputError`` naming the first place where ``value`` breaks ``schema`` (JSON Schema, with the
    draft the schema names; 2020-12 otherwise)."""
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the answer"
        raise StructuredOutputError(
            f"{provider}: the structured answer does not match the schema at {where}: {error.message}"
        )


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, ``retry-after`` in seconds or as an HTTP date."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def sdk_error(provider: str, exc: Exception, secrets: Iterable[str | None]) -> ProviderError:
    """Map an ``openai``/``anthropic`` SDK exception (both share one shape) to a ``ProviderError``.

    Retryable: HTTP 429 and 5xx, timeouts and connection errors; every other 4xx is final."""
    kind = type(exc).__name__
    status = getattr(exc, "status_code", None)
    message = redact(str(getattr(exc, "message", None) or exc), secrets)[:500]
    if isinstance(status, int):
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        return ProviderError(
            f"{provider}: HTTP {status} {kind}: {message}",
            retryable=status == 429 or status >= 500,
            status=status,
            retry_after_s=retry_after_s(headers) if status == 429 or status >= 500 else None,
        )
    if "Timeout" in kind:
        return ProviderError(f"{provider}: request timed out ({kind})", retryable=True)
    if "Connection" in kind:
        return ProviderError(f"{provider}: connection failed ({kind}): {message}", retryable=True)
    return ProviderError(f"{provider}: {kind}: {message}")

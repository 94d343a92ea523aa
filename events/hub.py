"""Events of the agent hub (seed 002): agent lifecycle, chat messages, LLM completions, heartbeats."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from events.registry import EventData, event_type

AGENT_ID_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


class IntegrationConfig(BaseModel):
    """One integration of an agent, as in the seed: ``{"type": "telegram", "settings": {...}}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["telegram", "websocket", "webhook"]
    settings: dict[str, Any] = Field(default_factory=dict)


class AgentSettings(BaseModel):
    """The seed's ``settings`` block of an agent config."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str = "You are a helpful assistant."
    model_id: str = "scripted"
    provider: Literal["scripted", "openai", "openai_compatible", "anthropic"] = "scripted"
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(512, ge=1, le=200_000)
    base_url: str | None = None
    budget_usd: float | None = Field(None, ge=0, description="no more completions once they have cost this much")
    integrations: list[IntegrationConfig] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _unwrap_seed_form(cls, v: Any) -> Any:
        return settings_block(v)


def settings_block(v: Any) -> Any:
    """Accept the seed's stored form ``{"simple": {"settings": {...}}}`` as well as the bare block."""
    if isinstance(v, dict) and len(v) == 1:
        (inner,) = v.values()
        if isinstance(inner, dict) and set(inner) == {"settings"}:
            return inner["settings"]
    return v


def check_agent_id(v: str) -> str:
    if not AGENT_ID_RE.match(v):
        raise ValueError("agent id must be 1-64 letters, digits or underscores")
    return v


@event_type("agent.created")
class AgentCreated(EventData):
    agent_id: str
    name: str
    settings: AgentSettings

    _check = field_validator("agent_id")(check_agent_id)


@event_type("agent.updated")
class AgentUpdated(EventData):
    name: str | None = None
    settings: AgentSettings | None = None


@event_type("agent.deleted")
class AgentDeleted(EventData):
    pass


@event_type("agent.started")
class AgentStarted(EventData):
    pass


@event_type("agent.stopped")
class AgentStopped(EventData):
    reason: str = "requested"


@event_type("agent.restarted")
class AgentRestarted(EventData):
    attempt: int
    reason: str


@event_type("agent.failed")
class AgentFailed(EventData):
    reason: str


@event_type("chat.message_received")
class MessageReceived(EventData):
    """The seed's incoming message structure, plus the agent it is addressed to."""

    agent_id: str
    text: str = Field(min_length=1, max_length=32_000)
    chat_id: str = Field(min_length=1, max_length=200)
    platform_user_id: str | None = None
    user_data: dict[str, Any] = Field(default_factory=dict)
    channel: str = "api"


@event_type("llm.completed")
class LLMCompleted(EventData):
    """A completion as recorded: replay reads this instead of calling the provider."""

    agent_id: str
    provider: str
    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    latency_ms: float
    cost_usd: float = 0.0
    request_hash: str
    run_id: str | None = None
    purpose: str | None = None
    structured: dict[str, Any] | None = None
    # Answered from the LLM router's cache. ``cost_usd`` is then 0 for an answer reused by another caller, or the
    # cost the provider was paid when this recorder's own earlier answer was never recorded: summing ``cost_usd``
    # counts every paid call once.
    cached: bool = False


@event_type("chat.reply_sent")
class ReplySent(EventData):
    """The seed's outgoing message structure."""

    agent_id: str
    chat_id: str
    response: str
    channel: str


@event_type("chat.reply_failed")
class ReplyFailed(EventData):
    agent_id: str
    chat_id: str
    error: str
    budget_exceeded: bool = False

"""Request and response bodies of the HTTP API (the seed's JSON structures)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from events.hub import AgentSettings, check_agent_id


class AgentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    name: str = Field(min_length=1, max_length=200)
    settings: AgentSettings = AgentSettings()

    _check = field_validator("id")(lambda v: v if v is None else check_agent_id(v))


class AgentPatch(BaseModel):
    """Fields to change; ``settings`` is merged into the current settings."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    settings: dict[str, Any] | None = None


class AgentOut(BaseModel):
    id: str
    name: str
    settings: AgentSettings
    status: str
    restarts: int
    version: int
    last_error: str | None = None
    last_heartbeat: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class MessageIn(BaseModel):
    """The seed's incoming message."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=32_000)
    chat_id: str = Field(min_length=1, max_length=200, pattern=r"^\S+$")
    platform_user_id: str | None = None
    user_data: dict[str, Any] = Field(default_factory=dict)
    channel: str = "api"


class MessageOut(BaseModel):
    """The seed's outgoing message."""

    chat_id: str
    response: str
    channel: str
    event_id: UUID
    reply_event_id: UUID


class Accepted(BaseModel):
    status: Literal["accepted"] = "accepted"
    event_id: UUID
    correlation_id: UUID
    detail: str


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    data: dict[str, Any]
    meta: dict[str, Any] = Field(default_factory=dict)


class AppendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[EventIn] = Field(min_length=1, max_length=1000)
    expected_version: int | Literal["any", "no_stream"] = "any"
    idempotency_key: str | None = Field(None, max_length=200)


class AppendOut(BaseModel):
    positions: list[int]
    versions: list[int]
    replayed: bool

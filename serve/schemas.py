"""Request and response bodies of the HTTP API (the seed's JSON structures)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from events.hub import AgentSettings, check_agent_id

INT64_MAX = 2**63 - 1
"""The largest position, version or transaction id a query parameter may name (Postgres ``bigint``)."""
_JSON_INT_MIN, _JSON_INT_MAX = -(2**63), 2**64 - 1  # what the log's JSON encoder (orjson) can write


def storable(value: Any, where: str = "value") -> Any:
    """``value`` unchanged if the log can store it as JSON, else ``ValueError`` naming the place: Postgres refuses
    the NUL character in text and in ``jsonb``, and the JSON encoder refuses integers beyond 64 bits."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where}: the NUL character (\\u0000) cannot be stored")
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if not _JSON_INT_MIN <= value <= _JSON_INT_MAX:
            raise ValueError(f"{where}: integer {value} is beyond the 64-bit range the log can store")
    elif isinstance(value, dict):
        for k, v in value.items():
            storable(k, f"{where} key")
            storable(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            storable(v, f"{where}[{i}]")
    return value


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

    @field_validator("text", "chat_id", "platform_user_id", "user_data", "channel")
    @classmethod
    def _storable(cls, v: Any, info: Any) -> Any:
        return storable(v, info.field_name)


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

    @field_validator("type", "data", "meta")
    @classmethod
    def _storable(cls, v: Any, info: Any) -> Any:
        return storable(v, info.field_name)


class AppendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[EventIn] = Field(min_length=1, max_length=1000)
    expected_version: Annotated[int, Field(ge=0, le=INT64_MAX)] | Literal["any", "no_stream"] = "any"
    idempotency_key: str | None = Field(None, max_length=200)

    _storable = field_validator("idempotency_key")(lambda v: storable(v, "idempotency_key"))


class AppendOut(BaseModel):
    positions: list[int]
    versions: list[int]
    replayed: bool

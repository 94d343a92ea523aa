"""The event envelope (DESIGN.md § Events): what every event carries besides its payload."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import Enum
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field
from uuid_utils.compat import uuid7

from events.pickling import PickledAsJson

STREAM_RE = re.compile(r"^[a-z][a-z0-9_]*-[^\s\x00-\x1f\x7f]{1,200}\Z")
"""A whole stream name, anchored with ``\\Z`` (``$`` also matches before a trailing newline, so ``"agent-7\\n"``
passed): no whitespace or control characters in the id."""


class _Sentinel(Enum):
    ANY = "any"
    NO_STREAM = "no_stream"


ANY = _Sentinel.ANY
NO_STREAM = _Sentinel.NO_STREAM
ExpectedVersion = int | _Sentinel
"""An exact stream version (0 = empty stream), ``ANY`` or ``NO_STREAM``."""


def new_id() -> UUID:
    """UUIDv7: time-ordered, so ids sort like the log (uuid_utils' ``compat`` form is the standard ``UUID`` type)."""
    return uuid7()


def utcnow() -> datetime:
    return datetime.now(UTC)


def category_of(stream: str) -> str:
    """``agent-7`` → ``agent``: the part before the first dash routes events."""
    return stream.split("-", 1)[0]


def validate_stream(stream: str) -> str:
    if not isinstance(stream, str) or not STREAM_RE.fullmatch(stream):
        raise ValueError(f"invalid stream name {stream!r}: expected '<category>-<id>' (lowercase category)")
    return stream


class Meta(BaseModel):
    """Tracing and bookkeeping: who caused what, and when."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")  # NaN reaches the log's check, not null

    correlation_id: UUID | None = None
    causation_id: UUID | None = None
    actor: str | None = None
    idempotency_key: str | None = None
    occurred_at: datetime = Field(default_factory=utcnow)
    schema_version: int = 1


class NewEvent(PickledAsJson):
    """An event about to be appended: the log assigns version and position."""

    id: UUID = Field(default_factory=new_id)
    type: str
    data: dict[str, Any]
    meta: Meta = Field(default_factory=Meta)

    @classmethod
    def of(cls, data: BaseModel, **meta: Any) -> NewEvent:
        """Wrap a registered payload model; its class knows its type name and schema version."""
        from events.registry import registry

        spec = registry.spec_for_model(type(data))
        m = Meta(schema_version=spec.schema_version, **meta)
        return cls(type=spec.name, data=data.model_dump(mode="json"), meta=m)

    def recorded(
        self, stream: str, version: int, position: int, tx_id: int = 0, recorded_at: datetime | None = None
    ) -> RecordedEvent:
        """This event as the log records it, for code that applies what it appended without reading it back (the
        entity host) or that decides without a log (replay, tests)."""
        return RecordedEvent(
            id=self.id,
            stream=stream,
            version=version,
            position=position,
            tx_id=tx_id,
            type=self.type,
            data=self.data,
            meta=self.meta,
            recorded_at=recorded_at or self.meta.occurred_at,
        )


class RecordedEvent(PickledAsJson):
    """An event as stored: position is global, version is within its stream."""

    model_config = ConfigDict(frozen=True)

    id: UUID
    stream: str
    version: int
    position: int
    tx_id: int
    type: str
    data: dict[str, Any]
    meta: Meta
    recorded_at: datetime

    @property
    def category(self) -> str:
        return category_of(self.stream)

    @property
    def stream_id(self) -> str:
        return self.stream.split("-", 1)[1]

    def payload(self) -> BaseModel:
        """The typed payload (upcast to the current schema on read)."""
        from events.registry import registry

        return registry.decode(self.type, self.data, self.meta.schema_version)

    @property
    def cursor(self) -> tuple[int, int]:
        """Commit-order cursor used by subscriptions (see storage/eventlog.py, trap 1)."""
        return (self.tx_id, self.position)

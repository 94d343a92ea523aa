"""Subscriptions: which events an actor type receives (by type, category and stream prefix)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from events.envelope import RecordedEvent


class Subscription(BaseModel):
    """Empty ``types``/``categories`` mean "all"; ``stream_prefix`` narrows to one entity family."""

    name: str
    types: frozenset[str] = Field(default_factory=frozenset)
    categories: frozenset[str] = Field(default_factory=frozenset)
    stream_prefix: str | None = None

    def matches(self, event: RecordedEvent) -> bool:
        if self.types and event.type not in self.types:
            return False
        if self.categories and event.category not in self.categories:
            return False
        return self.stream_prefix is None or event.stream.startswith(self.stream_prefix)

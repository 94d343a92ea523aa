"""Subscriptions: which events an actor type receives (by type, category and stream prefix)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from events.envelope import RecordedEvent


class Subscription(BaseModel):
    """Empty ``types``/``categories`` mean "all"; ``stream_prefix`` narrows to one entity family;
    ``data_match`` (any of its fields equal) routes by payload, e.g. tasks to the role they are assigned to."""

    name: str
    types: frozenset[str] = Field(default_factory=frozenset)
    categories: frozenset[str] = Field(default_factory=frozenset)
    stream_prefix: str | None = None
    data_match: dict[str, str] = Field(default_factory=dict)

    def matches(self, event: RecordedEvent) -> bool:
        if self.types and event.type not in self.types:
            return False
        if self.categories and event.category not in self.categories:
            return False
        if self.stream_prefix is not None and not event.stream.startswith(self.stream_prefix):
            return False
        return not self.data_match or any(event.data.get(k) == v for k, v in self.data_match.items())

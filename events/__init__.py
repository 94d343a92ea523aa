"""The event model: envelope, typed payloads, registry, upcasters and routing keys."""

from __future__ import annotations

from events.envelope import ANY, NO_STREAM, ExpectedVersion, Meta, NewEvent, RecordedEvent, category_of
from events.registry import EventData, UnknownEventType, event_type, registry
from events.routing import Subscription

__all__ = [
    "ANY",
    "NO_STREAM",
    "EventData",
    "ExpectedVersion",
    "Meta",
    "NewEvent",
    "RecordedEvent",
    "Subscription",
    "UnknownEventType",
    "category_of",
    "event_type",
    "registry",
]

# Importing the catalogues registers every event type of the system.
from events import hub, system, team  # noqa: F401

"""Runtime events: durable timers, durable routes and the LLM actor's named scripts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field, field_validator

from events.envelope import validate_stream
from events.registry import EventData, event_type


@event_type("timer.scheduled")
class TimerScheduled(EventData):
    """Fires ``timer.fired`` into ``target_stream`` at ``fire_at``, even across restarts."""

    timer_id: str
    fire_at: datetime
    target_stream: str
    payload: dict[str, Any] = Field(default_factory=dict)

    @field_validator("target_stream")
    @classmethod
    def _stream_name(cls, v: str) -> str:
        """Checked when the timer is scheduled: a name the log refuses could only fail when the timer fires."""
        return validate_stream(v)


@event_type("timer.fired")
class TimerFired(EventData):
    timer_id: str
    scheduled_position: int
    payload: dict[str, Any] = Field(default_factory=dict)


@event_type("timer.failed")
class TimerFailed(EventData):
    """A timer the log refused to fire (a target stream scheduled before names were checked, a payload over the
    size limit): recorded in the timer's own stream, so the orchestrator does not try it again after a restart."""

    timer_id: str
    scheduled_position: int
    error: str


@event_type("subscriber.registered")
class SubscriberRegistered(EventData):
    """A durable route: the orchestrator recreates it after a restart. ``actor`` is ``module:Class`` of a
    ``ray.remote`` class constructed as ``Class(runtime_config, *args)``."""

    subscription: dict[str, Any]
    actor: str
    args: list[Any] = Field(default_factory=list)


@event_type("llm.script_registered")
class ScriptRegistered(EventData):
    """A named scripted provider (``scripted:<name>``); the LLM actor registers them all again when it restarts."""

    name: str
    rules: list[dict[str, Any]]


@event_type("projection.event_failed")
class ProjectionEventFailed(EventData):
    """An event a projection could not apply for what it holds (a sum beyond a column's range, say), skipped so
    the projection goes on without it; a rebuild after a fix applies it again."""

    subscriber: str
    event_id: str
    position: int
    stream: str
    type: str
    error: str

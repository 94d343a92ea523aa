"""The agent aggregate (stream ``agent-<id>``): config and lifecycle, folded from its events."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from events import RecordedEvent
from events.hub import AgentSettings

Status = Literal["absent", "stopped", "running", "error", "deleted"]


def agent_stream(agent_id: str) -> str:
    return f"agent-{agent_id}"


class AgentState(BaseModel):
    agent_id: str = ""
    name: str = ""
    settings: AgentSettings = AgentSettings()
    status: Status = "absent"
    restarts: int = 0
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    last_error: str | None = None

    @property
    def exists(self) -> bool:
        return self.status not in ("absent", "deleted")


def evolve_agent(state: AgentState, event: RecordedEvent) -> AgentState:
    d = event.data
    t = event.type
    if t == "agent.created":
        state = AgentState(
            agent_id=d["agent_id"],
            name=d["name"],
            settings=AgentSettings.model_validate(d["settings"]),
            status="stopped",
            created_at=event.recorded_at,
        )
    elif t == "agent.updated":
        if d.get("name") is not None:
            state.name = d["name"]
        if d.get("settings") is not None:
            state.settings = AgentSettings.model_validate(d["settings"])
    elif t == "agent.started":
        state.status, state.restarts, state.last_error = "running", 0, None
    elif t == "agent.stopped":
        state.status = "stopped"
    elif t == "agent.restarted":
        state.restarts = d["attempt"]
    elif t == "agent.failed" and state.status == "running":
        # A runner that kept failing ends a running agent in error; one recorded after a stop or a delete (the
        # orchestrator gave up on a runner the agent no longer needed) changes nothing: it brought a deleted agent
        # back, as in error.
        state.status, state.last_error = "error", d["reason"]
    elif t == "agent.deleted":
        state.status = "deleted"
    state.version = event.version
    state.updated_at = event.recorded_at
    return state


def fold_agent(events: list[RecordedEvent]) -> AgentState:
    state = AgentState()
    for e in events:
        state = evolve_agent(state, e)
    return state

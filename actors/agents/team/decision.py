"""Group decisions (the seed's V-team): Finance, Risk, Legal and Tech Lead each set their criteria and give a
verdict in parallel (parallel Ray calls to their actors); the CEO decides from all verdicts. Every verdict, the
LLM answers behind them, and the decision are events of stream ``decision-<id>``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, Field

from actors.agents.team.roles import CEO, role
from actors.agents.team.services import Completed, TeamServices
from actors.entity import Context, Entity, Spawn
from events import NewEvent, RecordedEvent
from events.team import DecisionMade

DECIDE_SCHEMA = {
    "type": "object",
    "properties": {
        "decision": {"type": "string", "enum": ["approve", "reject", "conditional"]},
        "rationale": {"type": "string"},
    },
    "required": ["decision", "rationale"],
}

AskVoter = Callable[[str, str, str, str], Awaitable[list[dict[str, Any]]]]
"""(voter role, decision id, run id, question) -> the voter's events as ``NewEvent`` dicts."""


class DecisionState(BaseModel):
    decision_id: str = ""
    run_id: str = ""
    question: str = ""
    voters: list[str] = Field(default_factory=list)
    verdicts: dict[str, dict[str, Any]] = Field(default_factory=dict)
    completions: dict[str, Completed] = Field(default_factory=dict)
    decision: str | None = None


def evolve_decision(s: DecisionState, e: RecordedEvent) -> DecisionState:
    d = e.data
    if e.type == "decision.requested":
        s = DecisionState(decision_id=d["decision_id"], run_id=d["run_id"], question=d["question"], voters=d["voters"])
    elif e.type == "decision.verdict":
        s.verdicts[d["role"]] = d
    elif e.type == "llm.completed" and d.get("purpose"):
        s.completions[d["purpose"]] = Completed(text=d["text"], structured=d.get("structured"))
    elif e.type == "decision.made":
        s.decision = d["decision"]
    return s


class Decision(Entity[DecisionState]):
    category = "decision"

    def __init__(self, services: TeamServices, ask_voter: AskVoter) -> None:
        self.services = services
        self.ask_voter = ask_voter

    def initial(self) -> DecisionState:
        return DecisionState()

    def evolve(self, state: DecisionState, event: RecordedEvent) -> DecisionState:
        return evolve_decision(state, event)

    async def decide(self, s: DecisionState, message: RecordedEvent, ctx: Context) -> list[NewEvent | Spawn]:
        if not s.decision_id or s.decision is not None:
            return []
        missing = [v for v in s.voters if v not in s.verdicts]
        if missing:
            answers = await asyncio.gather(*(self.ask_voter(v, s.decision_id, s.run_id, s.question) for v in missing))
            return [NewEvent.model_validate(e) for events in answers for e in events]
        run = await self.services.run(s.run_id)
        ceo = role("ceo")
        assert isinstance(ceo, CEO)
        ev, answer = await self.services.ask(
            s.completions, "decide", "ceo", run, ceo.decide_prompt(s.question, s.verdicts), DECIDE_SCHEMA
        )
        if ev:
            return ev
        assert answer is not None
        v = answer.structured or {}
        decision = v.get("decision") if v.get("decision") in ("approve", "reject", "conditional") else "conditional"
        votes = {r: d["verdict"] for r, d in s.verdicts.items()}
        return [
            NewEvent.of(
                DecisionMade(
                    decision_id=s.decision_id,
                    run_id=s.run_id,
                    decision=decision,
                    rationale=str(v.get("rationale", "")),
                    votes=votes,
                )
            )
        ]

"""Group decisions (the seed's V-team): Finance, Risk, Legal and Tech Lead each set their criteria and give a
verdict in parallel (parallel Ray calls to their actors); the CEO decides from all verdicts. Every verdict, the
LLM answers behind them, and the decision are events of stream ``decision-<id>``.

A voter that fails (its LLM call, its actor) is recorded as ``decision.voter_failed`` beside the verdicts the
others gave (and paid for), and the CEO decides from those; when the CEO's own call fails, or nobody voted, the
decision is recorded as ``decision.failed``, as it is when a step keeps failing on anything else (a bug, the
machine)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, Field

from actors.agents.team.roles import CEO, role
from actors.agents.team.services import PAID, Completed, TeamServices, crash_reason
from actors.entity import Context, Entity, Spawn
from actors.llm.base import ProviderError
from actors.llm.budget import BudgetExceededError, paid_without_text
from events import NewEvent, RecordedEvent
from events.team import BudgetExceeded, DecisionFailed, DecisionMade, DecisionVoterFailed

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
    failed_voters: dict[str, str] = Field(default_factory=dict)
    completions: dict[str, Completed] = Field(default_factory=dict)
    decision: str | None = None
    failure: str | None = None


def evolve_decision(s: DecisionState, e: RecordedEvent) -> DecisionState:
    d = e.data
    if e.type == "decision.requested":
        s = DecisionState(decision_id=d["decision_id"], run_id=d["run_id"], question=d["question"], voters=d["voters"])
    elif e.type == "decision.verdict":
        s.verdicts[d["role"]] = d
    elif e.type == "decision.voter_failed":
        s.failed_voters[d["role"]] = d["error"]
    elif e.type == "decision.failed":
        s.failure = d["reason"]
    elif e.type == "llm.completed" and d.get("purpose"):
        s.completions[d["purpose"]] = Completed(text=d["text"], structured=d.get("structured"))
    elif e.type == "decision.made":
        s.decision = d["decision"]
    return s


class Decision(Entity[DecisionState]):
    category = "decision"
    conflict_keeps = PAID

    def __init__(self, services: TeamServices, ask_voter: AskVoter) -> None:
        self.services = services
        self.ask_voter = ask_voter

    def initial(self) -> DecisionState:
        return DecisionState()

    def evolve(self, state: DecisionState, event: RecordedEvent) -> DecisionState:
        return evolve_decision(state, event)

    @staticmethod
    def ids(s: DecisionState) -> dict[str, str]:
        return {"decision_id": s.decision_id, "run_id": s.run_id}

    async def decide(self, s: DecisionState, message: RecordedEvent, ctx: Context) -> list[NewEvent | Spawn]:
        if not s.decision_id or s.decision is not None or s.failure is not None:
            return []
        missing = [v for v in s.voters if v not in s.verdicts and v not in s.failed_voters]
        if missing:
            answers = await asyncio.gather(
                *(self.ask_voter(v, s.decision_id, s.run_id, s.question) for v in missing), return_exceptions=True
            )
            out: list[NewEvent | Spawn] = []
            for voter, answer in zip(missing, answers, strict=True):
                if isinstance(answer, BaseException):
                    if not isinstance(answer, Exception):
                        raise answer  # cancellation and the like are not a voter's failure
                    cause = getattr(answer, "cause", None)  # Ray's error wraps the voter's own
                    err = cause if isinstance(cause, Exception) else answer
                    error = f"{type(err).__name__}: {err}"[:2000]
                    out.append(NewEvent.of(DecisionVoterFailed(**self.ids(s), role=voter, error=error)))
                else:  # the voters that answered: their paid completions and verdicts are kept
                    out += [NewEvent.model_validate(e) for e in answer]
            return out
        if not s.verdicts:
            return [NewEvent.of(DecisionFailed(**self.ids(s), reason="no voter gave a verdict"))]
        run = await self.services.run(s.run_id)
        ceo = role("ceo")
        assert isinstance(ceo, CEO)
        try:
            ev, answer = await self.services.ask(
                s.completions,
                "decide",
                "ceo",
                run,
                ceo.decide_prompt(s.question, s.verdicts, s.failed_voters),
                DECIDE_SCHEMA,
                recorder=f"decision-{s.decision_id}",
            )
        except BudgetExceededError as e:
            over = NewEvent.of(BudgetExceeded(run_id=s.run_id, spent_usd=e.spent, budget_usd=e.budget))
            return [NewEvent.of(DecisionFailed(**self.ids(s), reason=str(e))), Spawn(f"run-{s.run_id}", [over])]
        except ProviderError as e:
            return [NewEvent.of(DecisionFailed(**self.ids(s), reason=f"LLM call failed: {e}"))]
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

    def crashed(
        self, s: DecisionState, message: RecordedEvent, ctx: Context, error: Exception, decided: list[NewEvent]
    ) -> list[NewEvent]:
        """A step that kept failing on something no answer caused (a bug, the machine) fails the decision now,
        with what its last decision paid for (text removed): skipped, it left the decision open for ever, and
        whoever asked for it waiting."""
        paid = paid_without_text(decided)
        if not s.decision_id or s.decision is not None or s.failure is not None:
            return paid
        reason = crash_reason("step failed", error, self.services.workspaces)
        return [*paid, NewEvent.of(DecisionFailed(**self.ids(s), reason=reason))]

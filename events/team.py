"""Events of the autonomous role-agent team (seed 004): runs, tasks, attempts, reviews, decisions, memory."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from events.registry import EventData, event_type

Priority = int  # 1 = high, 5 = medium, 10 = low (the seed's scale)
TaskKind = Literal["generic", "implement"]


def as_utc(value: datetime) -> datetime:
    """A deadline without a time zone ("2030-01-01T00:00:00") is UTC; one with a zone is converted to UTC, so
    deadlines compare with each other and with ``datetime.now(UTC)``."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Deadline = Annotated[datetime, AfterValidator(as_utc)]


@event_type("run.started")
class RunStarted(EventData):
    """A team run: the CEO's strategy, the budget and per-role overrides (model, prompt)."""

    run_id: str
    goal: str
    strategy: list[str] = Field(default_factory=list)
    budget_usd: float | None = None
    model: str | None = None
    provider: str = "scripted"
    prompts: dict[str, str] = Field(default_factory=dict)
    max_generated_tasks: int = 5
    ceo_interval_s: float = 2.0
    workspace: str | None = None


@event_type("run.forked")
class RunForked(EventData):
    run_id: str
    from_run: str
    at_position: int
    model: str | None = None
    prompts: dict[str, str] = Field(default_factory=dict)


@event_type("run.budget_exceeded")
class BudgetExceeded(EventData):
    run_id: str
    spent_usd: float
    budget_usd: float


@event_type("run.completed")
class RunCompleted(EventData):
    run_id: str
    summary: str


@event_type("ceo.checked")
class CeoChecked(EventData):
    """One tick of the CEO loop: what it saw and how many tasks it made; ``error`` when asking the LLM for new
    tasks failed, or the tick's handling kept failing (the loop ticks on and tries again at the next tick)."""

    run_id: str
    active: int
    pending: int
    generated: int
    error: str | None = None


@event_type("task.created")
class TaskCreated(EventData):
    task_id: str
    run_id: str
    title: str
    description: str = ""
    kind: TaskKind = "generic"
    role: str
    priority: Priority = Field(5, ge=1, le=10)
    deadline: Deadline | None = None
    timeout_s: float = 300.0
    created_by: str = "api"
    spec: dict[str, Any] = Field(default_factory=dict)


@event_type("task.assigned")
class TaskAssigned(EventData):
    task_id: str
    run_id: str
    role: str
    phase: str = "work"
    priority: Priority = Field(5, ge=1, le=10)
    deadline: Deadline | None = None  # the task's, carried so the role's queue orders by it (as by priority)


@event_type("task.started")
class TaskStarted(EventData):
    task_id: str
    run_id: str
    role: str
    timer_id: str


@event_type("task.priority_raised")
class TaskPriorityRaised(EventData):
    task_id: str
    run_id: str
    priority: Priority
    reason: str


@event_type("task.attempted")
class TaskAttempted(EventData):
    """One attempt and its self-validation (the seed's valid/score/issues)."""

    task_id: str
    run_id: str
    role: str
    attempt: int
    approach: int
    output: str
    valid: bool
    score: float
    issues: list[str] = Field(default_factory=list)
    tests: dict[str, Any] | None = None


@event_type("task.files_written")
class FilesWritten(EventData):
    task_id: str
    run_id: str
    role: str
    branch: str
    files: dict[str, str]
    commit: str


@event_type("task.review_requested")
class ReviewRequested(EventData):
    task_id: str
    run_id: str
    role: str
    owner: str
    priority: Priority = Field(5, ge=1, le=10)
    deadline: Deadline | None = None


@event_type("task.reviewed")
class TaskReviewed(EventData):
    task_id: str
    run_id: str
    role: str
    owner: str
    approved: bool
    comments: str
    priority: Priority = Field(5, ge=1, le=10)
    deadline: Deadline | None = None


@event_type("task.merged")
class TaskMerged(EventData):
    task_id: str
    run_id: str
    branch: str
    commit: str
    approved_by: str


@event_type("task.completed")
class TaskCompleted(EventData):
    task_id: str
    run_id: str
    role: str
    result: str


@event_type("task.failed")
class TaskFailed(EventData):
    task_id: str
    run_id: str
    role: str
    reason: str


@event_type("task.cancelled")
class TaskCancelled(EventData):
    task_id: str
    run_id: str
    reason: str


@event_type("task.timed_out")
class TaskTimedOut(EventData):
    task_id: str
    run_id: str
    role: str
    timeout_s: float


@event_type("task.escalated")
class TaskEscalated(EventData):
    task_id: str
    run_id: str
    from_role: str
    to_role: str
    reason: str


@event_type("decision.requested")
class DecisionRequested(EventData):
    decision_id: str
    run_id: str
    question: str
    voters: list[str]


@event_type("decision.verdict")
class DecisionVerdict(EventData):
    decision_id: str
    run_id: str
    role: str
    criteria: list[str]
    verdict: Literal["approve", "reject", "conditional"]
    rationale: str


@event_type("decision.voter_failed")
class DecisionVoterFailed(EventData):
    """A voter gave no verdict (its LLM call failed, its actor could not be reached); the CEO decides without it."""

    decision_id: str
    run_id: str
    role: str
    error: str


@event_type("decision.failed")
class DecisionFailed(EventData):
    """No decision could be made (the CEO's own LLM call failed, or no voter gave a verdict)."""

    decision_id: str
    run_id: str
    reason: str


@event_type("decision.made")
class DecisionMade(EventData):
    decision_id: str
    run_id: str
    decision: Literal["approve", "reject", "conditional"]
    rationale: str
    votes: dict[str, str]


@event_type("memory.noted")
class MemoryNoted(EventData):
    """Something a role keeps for later (the seed's agent memory table)."""

    role: str
    run_id: str
    key: str
    content: str

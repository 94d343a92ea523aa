"""The CEO loop (stream ``run-<id>``): a durable timer ticks; when no task of the run is active or pending, the
CEO turns its strategy into new tasks, never more than ``max_generated_tasks`` in a run, so a runaway loop
cannot flood the queues. When it is idle and has nothing more to make, the run is completed.

A failed LLM call does not stop the loop, nor does a tick whose handling kept failing on something else (a bug, the
machine): the tick is recorded with its error and the next tick is scheduled; after ``MAX_FAILED_TICKS`` failures
in a row the run is completed with the last error in its summary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, Field

from actors.agents.team.roles import CEO, ROLES, TASKS_SCHEMA, role
from actors.agents.team.services import PAID, Completed, RunConfig, TeamServices, crash_reason, fold_run
from actors.entity import Context, Entity, Spawn
from actors.llm.base import ProviderError
from actors.llm.budget import BudgetExceededError, paid_without_text
from actors.team_projection import TASK_STATUS
from events import NewEvent, RecordedEvent
from events.system import TimerScheduled
from events.team import BudgetExceeded, CeoChecked, RunCompleted, TaskCreated

MAX_FAILED_TICKS = 3
STATUS_OF = {"task.created": "pending", **TASK_STATUS}  # a task's status after each event that sets it
# Each task of the run: its newest event that sets a status, and its title (from its first); through the index of
# events by run (migration 0009).
TASK_STATUS_SQL = (
    "SELECT DISTINCT ON (stream) type, title FROM (SELECT stream, version, type, first_value(data->>'title') "
    "OVER (PARTITION BY stream ORDER BY version) AS title FROM events WHERE data->>'run_id' = $1 "
    "AND type = ANY($2::text[])) e ORDER BY stream, version DESC"
)


class RunState(BaseModel):
    run_id: str = ""
    status: str = "absent"
    ticks: int = 0
    scheduled: int = 0
    generated: int = 0
    failed_ticks: int = 0  # ticks in a row whose LLM call failed
    completions: dict[str, Completed] = Field(default_factory=dict)


def evolve_run(s: RunState, e: RecordedEvent) -> RunState:
    d, t = e.data, e.type
    if t in ("run.started", "run.forked"):
        s.run_id, s.status = d["run_id"], "running"
    elif t == "timer.scheduled":
        s.scheduled += 1
    elif t == "ceo.checked":
        s.ticks += 1
        s.generated += d["generated"]
        s.failed_ticks = s.failed_ticks + 1 if d.get("error") else 0
    elif t == "llm.completed" and d.get("purpose"):
        s.completions[d["purpose"]] = Completed(text=d["text"], structured=d.get("structured"))
    elif t == "run.completed":
        s.status = "completed"
    elif t == "run.budget_exceeded":
        s.status = "budget_exceeded"
    return s


class Run(Entity[RunState]):
    category = "run"
    conflict_keeps = PAID
    max_steps = 8

    def __init__(self, services: TeamServices) -> None:
        self.services = services

    def initial(self) -> RunState:
        return RunState()

    def evolve(self, state: RunState, event: RecordedEvent) -> RunState:
        return evolve_run(state, event)

    def tick_timer(self, s: RunState, interval: float) -> NewEvent:
        n = s.scheduled + 1
        return NewEvent.of(
            TimerScheduled(
                timer_id=f"ceo:{s.run_id}:{n}",
                fire_at=datetime.now(UTC) + timedelta(seconds=interval),
                target_stream=f"run-{s.run_id}",
                payload={"kind": "ceo_tick", "tick": n},
            )
        )

    async def decide(self, s: RunState, message: RecordedEvent, ctx: Context) -> list[NewEvent | Spawn]:
        if s.status != "running":
            return []
        run = await self.services.run(s.run_id)
        if message.type in ("run.started", "run.forked"):
            return [self.tick_timer(s, run.ceo_interval_s)] if s.scheduled == 0 else []
        if not _current_tick(s, message):
            return []  # not the current tick, or already handled
        active, pending, done = await self.task_counts(s.run_id)
        if active or pending:
            return [
                NewEvent.of(CeoChecked(run_id=s.run_id, active=active, pending=pending, generated=0)),
                self.tick_timer(s, run.ceo_interval_s),
            ]
        room = run.max_generated_tasks - s.generated
        tasks: list[dict] = []
        if room > 0 and run.strategy:
            ceo = role("ceo")
            assert isinstance(ceo, CEO)
            prompt = ceo.generate_prompt(run.goal, run.strategy, done, room)
            try:
                ev, answer = await self.services.ask(
                    s.completions,
                    f"generate:{s.scheduled}",
                    "ceo",
                    run,
                    prompt,
                    TASKS_SCHEMA,
                    recorder=f"run-{s.run_id}",
                )
            except BudgetExceededError as e:
                return [NewEvent.of(BudgetExceeded(run_id=s.run_id, spent_usd=e.spent, budget_usd=e.budget))]
            except ProviderError as e:  # retries are spent; record the tick and try again at the next one
                return self.failed_tick(s, f"LLM call failed: {e}", run.ceo_interval_s, f"{len(done)} tasks done; ")
            if ev:
                return ev
            assert answer is not None
            tasks = [t for t in (answer.structured or {}).get("tasks", []) if t.get("role") in ROLES][:room]
        checked = NewEvent.of(CeoChecked(run_id=s.run_id, active=0, pending=0, generated=len(tasks)))
        if not tasks:
            return [
                checked,
                NewEvent.of(RunCompleted(run_id=s.run_id, summary=f"{len(done)} tasks done; nothing left")),
            ]
        spawns = [
            Spawn(
                f"task-{s.run_id}.g{s.scheduled}.{i}",
                [
                    NewEvent.of(
                        TaskCreated(
                            task_id=f"{s.run_id}.g{s.scheduled}.{i}",
                            run_id=s.run_id,
                            title=t["title"],
                            description=t.get("description", ""),
                            role=t["role"],
                            priority=_priority(t.get("priority")),
                            created_by="ceo",
                        )
                    )
                ],
            )
            for i, t in enumerate(tasks, 1)
        ]
        return [checked, self.tick_timer(s, run.ceo_interval_s), *spawns]

    def failed_tick(self, s: RunState, error: str, interval: float, done: str = "") -> list[NewEvent]:
        """The tick recorded with ``error``; the next one scheduled, or the run completed after too many."""
        failed = NewEvent.of(CeoChecked(run_id=s.run_id, active=0, pending=0, generated=0, error=error))
        if s.failed_ticks + 1 >= MAX_FAILED_TICKS:
            summary = f"{done}stopped after {MAX_FAILED_TICKS} failed ticks: {error}"
            return [failed, NewEvent.of(RunCompleted(run_id=s.run_id, summary=summary[:2000]))]
        return [failed, self.tick_timer(s, interval)]

    def crashed(
        self, s: RunState, message: RecordedEvent, ctx: Context, error: Exception, decided: list[NewEvent]
    ) -> list[NewEvent]:
        """A tick (or a run's start) whose handling kept failing on something no answer caused is a failed tick:
        skipped, it scheduled no next tick, and the run stayed running with nothing left to wake it. What its last
        decision paid for is kept, without the text."""
        paid = paid_without_text(decided)
        if s.status != "running":
            return paid
        cfg = self.services.cached_run(s.run_id)  # not cached: reading it may be what failed
        interval = cfg.ceo_interval_s if cfg else RunConfig.model_fields["ceo_interval_s"].default
        if message.type in ("run.started", "run.forked"):
            return [*paid, self.tick_timer(s, interval)] if s.scheduled == 0 else paid
        if not _current_tick(s, message):
            return paid
        return [*paid, *self.failed_tick(s, crash_reason("tick failed", error, self.services.workspaces), interval)]

    async def task_counts(self, run_id: str) -> tuple[int, int, list[str]]:
        """Active and pending tasks, and the titles of those completed, from the log: the read model trails it
        (the projector's batches), and a tick counted from it saw none of the tasks the tick before had just
        made, so it made more, or completed the run with tasks still pending."""
        rows = await self.services.store.fetch(TASK_STATUS_SQL, run_id, list(STATUS_OF))
        status = [(STATUS_OF[r["type"]], r["title"]) for r in rows]
        active = sum(1 for st, _ in status if st in ("in_progress", "review"))
        pending = sum(1 for st, _ in status if st == "pending")
        return active, pending, [title for st, title in status if st == "completed"]


def _current_tick(s: RunState, message: RecordedEvent) -> bool:
    """Whether ``message`` fires the tick scheduled last, not yet handled."""
    return message.type == "timer.fired" and message.data["payload"].get("tick") == s.scheduled > s.ticks


def _priority(v: object) -> int:
    return v if isinstance(v, int) and v in (1, 5, 10) else 5


__all__ = ["Run", "RunState", "evolve_run", "fold_run"]

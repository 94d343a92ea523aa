"""HTTP API of the role-agent team: runs, tasks, roles, decisions, usage (all behind the bearer token)."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.agents.team.actors import ensure_team
from actors.agents.team.roles import ROLES, VOTERS
from actors.agents.team.services import fold_run
from actors.agents.team.task import TERMINAL, TaskState, evolve_task
from events import NO_STREAM, NewEvent, registry
from events.team import DecisionRequested, RunStarted, TaskCancelled, TaskCreated
from serve.deps import HubDep, ReadModelsDep
from serve.fast_route import KEY_MAX
from serve.hub import Hub
from storage.errors import WrongExpectedVersion

PRIORITIES = {"high": 1, "medium": 5, "low": 10}
TEAM_READY_TIMEOUT_S = 30.0
IdempotencyKey = Annotated[str | None, Header(max_length=KEY_MAX)]


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    goal: str = Field(min_length=1, max_length=4000)
    strategy: list[str] = Field(default_factory=list, max_length=50)
    budget_usd: float | None = Field(None, ge=0)
    provider: str = "scripted"
    model: str | None = None
    prompts: dict[str, str] = Field(default_factory=dict)
    max_generated_tasks: int = Field(5, ge=0, le=100)
    ceo_interval_s: float = Field(2.0, gt=0, le=3600)
    # a name under the data dir's workspaces (by default the run id), never a path: a client must not point git
    # and the test runner at any directory of the host
    workspace: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

    @field_validator("prompts")
    @classmethod
    def _known_roles(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles: {sorted(unknown)}")
        return v


class TaskIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=500)
    description: str = Field("", max_length=20_000)
    kind: Literal["generic", "implement"] = "generic"
    role: str | None = None
    priority: int | Literal["high", "medium", "low"] = Field("medium", validate_default=True)
    deadline: datetime | None = None
    timeout_s: float = Field(300, gt=0, le=86_400)
    spec: dict[str, Any] = Field(default_factory=dict)

    @field_validator("priority")
    @classmethod
    def _priority(cls, v: int | str) -> int:
        p = PRIORITIES.get(v, v) if isinstance(v, str) else v
        if p not in (1, 5, 10):
            raise ValueError("priority is high=1, medium=5 or low=10")
        return int(p)


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=4000)
    voters: list[str] = Field(default_factory=lambda: list(VOTERS))


async def create(h: Hub, stream: str, event: NewEvent, key: str | None, id_field: str) -> dict[str, Any]:
    """Append what creates a run, task or decision (a new stream; its id is drawn at random), under the client's
    ``Idempotency-Key``: a retry after an unknown outcome (a 503, a dropped connection) gets the data recorded the
    first time, its id included, instead of creating a second one. The key is scoped by the event's type; used
    before for another request, it is a 422. Returns the recorded event's data."""
    scoped = None if key is None else f"create:{event.type}:{key}"
    res = await h.store.append(stream, [event], NO_STREAM, idempotency_key=scoped)
    if not res.replayed:
        return event.data
    original = await h.original_of(res.positions[0])
    asked = registry.validate(event.type, event.data, event.meta.schema_version)  # as the log holds it
    if original.type != event.type or {**original.data, id_field: None} != {**asked, id_field: None}:
        raise HTTPException(
            422,
            f"Idempotency-Key {key!r} was already used for a different request ({original.data.get(id_field)}); "
            "use a new key for a new one",
        )
    return original.data


async def team_ready(h: Hub) -> None:
    """The role actors and the CEO loop are registered. The registration is durable (events), so one success
    per replica is enough: this is not a Ray round trip per task."""
    if not h.team_registered:
        await h.ask(ensure_team(h.orchestrator), TEAM_READY_TIMEOUT_S)
        h.team_registered = True


def build_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1")

    async def run_or_404(h: Hub, run_id: str) -> dict[str, Any]:
        cfg = fold_run(await h.store.read_stream(f"run-{run_id}"))
        if cfg is None:
            raise HTTPException(404, f"unknown run {run_id!r}")
        return cfg.model_dump()

    @router.post("/runs", status_code=201)
    async def create_run(body: RunIn, h: HubDep, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
        await team_ready(h)
        run_id = "run_" + secrets.token_hex(5)
        ev = NewEvent.of(RunStarted(run_id=run_id, **body.model_dump()), actor="api")
        recorded = await create(h, f"run-{run_id}", ev, idempotency_key, "run_id")
        return {"run_id": recorded["run_id"], **body.model_dump()}

    @router.get("/runs/{run_id}")
    async def get_run(run_id: str, h: ReadModelsDep) -> dict[str, Any]:
        cfg = await run_or_404(h, run_id)
        row = await h.store.fetch("SELECT status FROM team_runs WHERE run_id = $1", run_id)
        tasks = await h.store.fetch(
            "SELECT status, count(*) AS n FROM team_tasks WHERE run_id = $1 GROUP BY status", run_id
        )
        return {**cfg, "status": row[0]["status"] if row else "starting", "tasks": {r["status"]: r["n"] for r in tasks}}

    @router.post("/runs/{run_id}/tasks", status_code=201)
    async def create_task(
        run_id: str, body: TaskIn, h: HubDep, idempotency_key: IdempotencyKey = None
    ) -> dict[str, Any]:
        await run_or_404(h, run_id)
        await team_ready(h)
        role = body.role or ("qa" if body.kind == "implement" else "developer")
        if role not in ROLES:
            raise HTTPException(422, f"unknown role {role!r}; roles: {', '.join(sorted(ROLES))}")
        if body.kind == "implement" and role != "qa":
            raise HTTPException(422, "an implement task starts with qa: the tests are written first")
        task_id = f"{run_id}.{secrets.token_hex(4)}"
        data = body.model_dump(exclude={"role"})
        ev = NewEvent.of(TaskCreated(task_id=task_id, run_id=run_id, role=role, **data), actor="api")
        recorded = await create(h, f"task-{task_id}", ev, idempotency_key, "task_id")
        return {
            "task_id": recorded["task_id"],
            "run_id": run_id,
            "role": role,
            "priority": body.priority,
            "status": "pending",
        }

    @router.get("/tasks")
    async def list_tasks(
        h: ReadModelsDep,
        status: str | None = None,
        run_id: str | None = None,
        role: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
    ) -> list[dict[str, Any]]:
        rows = await h.store.fetch(
            "SELECT * FROM team_tasks WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR run_id = $2) "
            "AND ($3::text IS NULL OR role = $3) ORDER BY priority, created_at LIMIT $4",
            status,
            run_id,
            role,
            limit,
        )
        return [dict(r) for r in rows]

    async def task_state(h: Hub, task_id: str) -> tuple[TaskState, list[Any]]:
        events = await h.store.read_stream(f"task-{task_id}")
        if not events:
            raise HTTPException(404, f"unknown task {task_id!r}")
        state = TaskState()
        for e in events:
            state = evolve_task(state, e)
        return state, events

    @router.get("/tasks/{task_id}")
    async def get_task(task_id: str, h: HubDep) -> dict[str, Any]:
        state, _ = await task_state(h, task_id)
        return state.model_dump(mode="json", exclude={"completions"})

    @router.get("/tasks/{task_id}/timeline")
    async def task_timeline(task_id: str, h: HubDep) -> list[dict[str, Any]]:
        _, events = await task_state(h, task_id)
        return [
            {
                "position": e.position,
                "version": e.version,
                "type": e.type,
                "at": e.recorded_at,
                "actor": e.meta.actor,
                "data": e.data,
            }
            for e in events
        ]

    @router.post("/tasks/{task_id}/cancel")
    async def cancel_task(task_id: str, h: HubDep, reason: str = "cancelled by request") -> dict[str, Any]:
        for _ in range(5):  # the team may be writing to the task right now: reload and decide again
            state, events = await task_state(h, task_id)
            if state.status in TERMINAL:
                raise HTTPException(409, f"task {task_id!r} is already {state.status}")
            ev = NewEvent.of(TaskCancelled(task_id=task_id, run_id=state.run_id, reason=reason), actor="api")
            try:
                await h.store.append(f"task-{task_id}", [ev], events[-1].version)
            except WrongExpectedVersion:
                continue
            return {"task_id": task_id, "status": "cancelled"}
        raise HTTPException(409, f"task {task_id!r} keeps changing; try again")

    @router.get("/roles")
    async def list_roles() -> list[dict[str, Any]]:
        return [r.config.model_dump() for r in ROLES.values()]

    @router.get("/roles/{role}/memory")
    async def role_memory(role: str, h: ReadModelsDep, limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        if role not in ROLES:
            raise HTTPException(404, f"unknown role {role!r}")
        memory = await h.store.fetch(
            "SELECT run_id, key, content, at FROM team_memory WHERE role = $1 ORDER BY position DESC LIMIT $2",
            role,
            limit,
        )
        activity = await h.store.fetch(
            "SELECT run_id, task_id, type, summary, at FROM team_activity WHERE role = $1 "
            "ORDER BY position DESC LIMIT $2",
            role,
            limit,
        )
        decisions = await h.store.fetch(
            "SELECT decision_id, question, verdicts -> $1 AS verdict FROM team_decisions WHERE verdicts ? $1 "
            "ORDER BY at DESC LIMIT $2",
            role,
            limit,
        )
        return {
            "role": role,
            "memory": [dict(r) for r in memory],
            "activity": [dict(r) for r in activity],
            "decisions": [dict(r) for r in decisions],
        }

    @router.post("/runs/{run_id}/decisions", status_code=202)
    async def request_decision(
        run_id: str, body: DecisionIn, h: HubDep, idempotency_key: IdempotencyKey = None
    ) -> dict[str, Any]:
        await run_or_404(h, run_id)
        unknown = set(body.voters) - set(ROLES)
        if unknown or not body.voters:
            raise HTTPException(422, f"voters must be known roles; unknown: {sorted(unknown)}")
        await team_ready(h)
        decision_id = "dec_" + secrets.token_hex(5)
        ev = NewEvent.of(
            DecisionRequested(decision_id=decision_id, run_id=run_id, question=body.question, voters=body.voters),
            actor="api",
        )
        recorded = await create(h, f"decision-{decision_id}", ev, idempotency_key, "decision_id")
        return {"decision_id": recorded["decision_id"], "status": "requested"}

    @router.get("/decisions/{decision_id}")
    async def get_decision(decision_id: str, h: HubDep) -> dict[str, Any]:
        events = await h.store.read_stream(f"decision-{decision_id}")
        if not events:
            raise HTTPException(404, f"unknown decision {decision_id!r}")
        out: dict[str, Any] = {"decision_id": decision_id, "verdicts": {}, "decision": None}
        for e in events:
            if e.type == "decision.requested":
                out.update(run_id=e.data["run_id"], question=e.data["question"], voters=e.data["voters"])
            elif e.type == "decision.verdict":
                out["verdicts"][e.data["role"]] = {k: e.data[k] for k in ("criteria", "verdict", "rationale")}
            elif e.type == "decision.made":
                out.update(decision=e.data["decision"], rationale=e.data["rationale"], votes=e.data["votes"])
        return out

    @router.get("/runs/{run_id}/usage")
    async def run_usage(run_id: str, h: ReadModelsDep) -> dict[str, Any]:
        await run_or_404(h, run_id)
        rows = [
            dict(r)
            for r in await h.store.fetch(
                "SELECT role, provider, model, calls, prompt_tokens, completion_tokens, cost_usd FROM team_usage "
                "WHERE run_id = $1 ORDER BY role",
                run_id,
            )
        ]
        return {
            "run_id": run_id,
            "calls": sum(r["calls"] for r in rows),
            "tokens": sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows),
            "cost_usd": sum(r["cost_usd"] for r in rows),
            "by_role": rows,
        }

    return router

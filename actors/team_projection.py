"""Projection of the team's events into the ``team_*`` read models (same transaction as the projector's
checkpoint, see actors/projections.py)."""

from __future__ import annotations

from typing import Any

from actors.statements import Statements
from events import RecordedEvent

TEAM_TABLES = ("team_runs", "team_tasks", "team_memory", "team_activity", "team_decisions", "team_usage")
TEAM_CATEGORIES = frozenset({"run", "task", "decision", "memory"})
TASK_STATUS = {
    "task.assigned": "pending",
    "task.started": "in_progress",
    "task.review_requested": "review",
    "task.reviewed": "in_progress",
    "task.completed": "completed",
    "task.failed": "failed",
    "task.cancelled": "cancelled",
}
# The events whose result or reason is the task's result (a raised priority's reason is not).
TASK_OUTCOMES = frozenset({"task.completed", "task.failed", "task.cancelled"})


def _summary(e: RecordedEvent) -> str:
    d = e.data
    for key in ("title", "output", "comments", "result", "reason", "to_role"):
        if d.get(key):
            return f"{e.type}: {str(d[key])[:300]}"
    return e.type


async def project_team(conn: Statements, e: RecordedEvent) -> None:
    d: dict[str, Any] = e.data
    t = e.type
    if t in ("run.started", "run.forked"):
        await conn.execute(
            "INSERT INTO team_runs VALUES ($1, $2, 'running', $3, $4, $5, $5) ON CONFLICT (run_id) DO NOTHING",
            d["run_id"],
            d.get("goal", ""),
            d.get("from_run"),
            d.get("budget_usd"),
            e.recorded_at,
        )
    elif t in ("run.completed", "run.budget_exceeded"):
        status = "completed" if t == "run.completed" else "budget_exceeded"
        await conn.execute(
            "UPDATE team_runs SET status = $2, updated_at = $3 WHERE run_id = $1", d["run_id"], status, e.recorded_at
        )
    elif t == "task.created":
        await conn.execute(
            "INSERT INTO team_tasks VALUES ($1, $2, $3, $4, $5, $5, $6, 'pending', 0, NULL, $7, $7) "
            "ON CONFLICT (task_id) DO NOTHING",
            d["task_id"],
            d["run_id"],
            d["title"],
            d["kind"],
            d["role"],
            d["priority"],
            e.recorded_at,
        )
    elif t in TASK_STATUS or t in ("task.attempted", "task.priority_raised"):
        await conn.execute(
            "UPDATE team_tasks SET status = coalesce($2, status), updated_at = $3, "
            "role = CASE WHEN $4::text IS NOT NULL THEN $4 ELSE role END, "
            "attempts = attempts + $5, priority = coalesce($6, priority), result = coalesce($7, result) "
            "WHERE task_id = $1",
            d["task_id"],
            TASK_STATUS.get(t),
            e.recorded_at,
            d["role"] if t == "task.assigned" else None,
            1 if t == "task.attempted" else 0,
            d.get("priority") if t == "task.priority_raised" else None,
            (d.get("result") or d.get("reason")) if t in TASK_OUTCOMES else None,
        )
    elif t == "memory.noted":
        await conn.execute(
            "INSERT INTO team_memory VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            e.position,
            d["role"],
            d["run_id"],
            d["key"],
            d["content"],
            e.recorded_at,
        )
    elif t == "decision.requested":
        await conn.execute(
            "INSERT INTO team_decisions (decision_id, run_id, question, at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT DO NOTHING",
            d["decision_id"],
            d["run_id"],
            d["question"],
            e.recorded_at,
        )
    elif t == "decision.verdict":
        await conn.execute(
            "UPDATE team_decisions SET verdicts = verdicts || jsonb_build_object($2::text, $3::jsonb) "
            "WHERE decision_id = $1",
            d["decision_id"],
            d["role"],
            d,
        )
    elif t == "decision.made":
        await conn.execute(
            "UPDATE team_decisions SET decision = $2, rationale = $3, votes = $4, at = $5 WHERE decision_id = $1",
            d["decision_id"],
            d["decision"],
            d["rationale"],
            d["votes"],
            e.recorded_at,
        )
    elif t == "llm.completed" and d.get("run_id"):
        await conn.execute(
            "INSERT INTO team_usage VALUES ($1, $2, $3, $4, 1, $5, $6, $7) "
            "ON CONFLICT (run_id, role, provider, model) DO UPDATE SET calls = team_usage.calls + 1, "
            "prompt_tokens = team_usage.prompt_tokens + EXCLUDED.prompt_tokens, "
            "completion_tokens = team_usage.completion_tokens + EXCLUDED.completion_tokens, "
            "cost_usd = team_usage.cost_usd + EXCLUDED.cost_usd",
            d["run_id"],
            d["agent_id"],
            d["provider"],
            d["model"],
            d["prompt_tokens"],
            d["completion_tokens"],
            d["cost_usd"],
        )
    if e.category == "task" and t.startswith("task.") and d.get("role"):
        await conn.execute(
            "INSERT INTO team_activity VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            e.position,
            d["role"],
            d["run_id"],
            d.get("task_id"),
            t,
            _summary(e),
            e.recorded_at,
        )

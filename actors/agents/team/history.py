"""Replay and fork of a team run.

Replay folds every task, decision and memory of a run from the log (no actor, no provider) and checks the
result against the read models. Fork copies a run's events up to a position into a new run (new stream names,
ids mapped, causation kept) and adds ``run.forked`` with the new model or prompts; the team then carries the
copy on from that point, while the original run's streams are never written. Timers that were pending at the fork
point are shifted by the time since then: a task that had four minutes left at the fork has four minutes left in
the copy, instead of timing out at once."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from actors.agents.team.decision import DecisionState, evolve_decision
from actors.agents.team.services import fold_run
from actors.agents.team.task import TaskState, evolve_task
from actors.projections import PROJECTOR
from events import Meta, NewEvent, RecordedEvent
from events.envelope import new_id
from events.team import RunForked
from storage.eventlog import START, Cursor, EventLog

# A run's events: the streams it touched (index events_run, migration 0009), then their events through the
# (stream, version) index. Matched by name and data alone, this scanned the whole log. The streams are an
# ``ARRAY(...)``, computed once: as an ``IN (subquery)`` the planner chose the scan until the new index had
# statistics (tests/test_team_steps.py checks the plan).
RUN_EVENTS = (
    "stream = ANY(ARRAY(SELECT DISTINCT stream FROM events WHERE data->>'run_id' IS NOT NULL "
    "AND data->>'run_id' = $3)) AND (stream = $1 OR stream LIKE $2 "
    "OR ((stream LIKE 'decision-%' OR stream LIKE 'memory-%') AND data->>'run_id' = $3)) "
    "AND ($4::bigint IS NULL OR position <= $4)"
)


async def run_events(store: EventLog, run_id: str, up_to: int | None = None) -> list[RecordedEvent]:
    """Every event of a run (its run stream, tasks, decisions and memory notes), in position order."""
    return await store.read_where(RUN_EVENTS, f"run-{run_id}", f"task-{run_id}.%", run_id, up_to)


@dataclass
class RunReplay:
    run_id: str
    events: int = 0
    tasks: dict[str, TaskState] = field(default_factory=dict)
    decisions: dict[str, DecisionState] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def _apply(report: RunReplay, e: RecordedEvent) -> None:
    report.events += 1
    if e.category == "task":
        report.tasks[e.stream_id] = evolve_task(report.tasks.get(e.stream_id, TaskState()), e)
    elif e.category == "decision":
        report.decisions[e.stream_id] = evolve_decision(report.decisions.get(e.stream_id, DecisionState()), e)
    elif e.type == "memory.noted":
        report.memory.append(e.data)


async def replay_run(store: EventLog, run_id: str) -> RunReplay:
    """Fold the run from the log, and check the read models against the log as far as the projector has
    projected it: the read models and the projector's checkpoint are written in one transaction and read here
    in one snapshot, so read models that trail a live run are not a mismatch."""
    async with store.connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        checkpoint = await conn.fetchrow("SELECT tx_id, position FROM checkpoints WHERE subscriber = $1", PROJECTOR)
        task_rows = await conn.fetch("SELECT task_id, status FROM team_tasks WHERE run_id = $1", run_id)
        decision_rows = await conn.fetch("SELECT decision_id, decision FROM team_decisions WHERE run_id = $1", run_id)
    projected: Cursor = (int(checkpoint[0]), int(checkpoint[1])) if checkpoint else START
    report, as_projected = RunReplay(run_id), RunReplay(run_id)
    for e in await run_events(store, run_id):
        _apply(report, e)
        if e.cursor <= projected:
            _apply(as_projected, e)
    for row in task_rows:
        rebuilt = as_projected.tasks.get(row["task_id"])
        if rebuilt is None or rebuilt.status != row["status"]:
            report.mismatches.append(
                f"task {row['task_id']}: read model says {row['status']}, log says "
                f"{rebuilt.status if rebuilt else 'nothing'}"
            )
    for row in decision_rows:
        rebuilt_d = as_projected.decisions.get(row["decision_id"])
        if rebuilt_d is None or rebuilt_d.decision != row["decision"]:
            report.mismatches.append(f"decision {row['decision_id']}: read model {row['decision']}")
    return report


def _rename(value: Any, renames: dict[str, str]) -> Any:
    """Apply the fork's id renames to every string inside ``value`` (stream names, ids, timer ids)."""
    text = json.dumps(value)
    for old, new in renames.items():
        text = text.replace(old, new)
    return json.loads(text)


def _shifted(fire_at: str, shift: timedelta) -> str:
    when = datetime.fromisoformat(fire_at)
    return ((when if when.tzinfo else when.replace(tzinfo=UTC)) + max(shift, timedelta(0))).isoformat()


async def fork_run(
    store: EventLog, run_id: str, at_position: int, *, model: str | None = None, prompts: dict[str, str] | None = None
) -> str:
    """Start a new run from the state of ``run_id`` at ``at_position``; returns the new run's id."""
    events = await run_events(store, run_id, at_position)
    if not events or events[0].type != "run.started":
        raise ValueError(f"run {run_id!r} has no events up to position {at_position}")
    if fold_run(await store.read_stream(f"run-{run_id}")) is None:
        raise ValueError(f"unknown run {run_id!r}")
    new_run = f"{run_id}_f{secrets.token_hex(3)}"
    renames = {run_id: new_run}
    for e in events:
        if e.type == "decision.requested":
            renames[e.data["decision_id"]] = f"{e.data['decision_id']}_{new_run}"
    ids: dict[UUID, UUID] = {}
    fork_time = await store.fetchval(
        "SELECT recorded_at FROM events WHERE position <= $1 ORDER BY position DESC LIMIT 1", at_position
    )
    shift = datetime.now(UTC) - (fork_time or events[-1].recorded_at)
    # One transaction: the team must not see (and act on) a half-copied run.
    async with store.connection() as conn, conn.transaction():
        # Several streams in one transaction: hold them all before the first write (EventLog.append says why).
        await store.lock_streams(conn, sorted({_rename(e.stream, renames) for e in events} | {f"run-{new_run}"}))
        for e in events:
            ids[e.id] = new_id()
            meta = e.meta.model_dump()
            for key in ("causation_id", "correlation_id"):
                if meta.get(key) in ids:
                    meta[key] = ids[meta[key]]
            meta.update(actor="fork", idempotency_key=None, forked_from=str(e.id))
            data = _rename(e.data, renames)
            if e.type == "timer.scheduled":
                data["fire_at"] = _shifted(data["fire_at"], shift)
            copy = NewEvent(id=ids[e.id], type=e.type, data=data, meta=Meta.model_validate(meta))
            stream = _rename(e.stream, renames)
            await store.append(stream, [copy], idempotency_key=f"fork:{new_run}:{e.position}", conn=conn)
            if e.type == "run.started":
                forked = RunForked(
                    run_id=new_run, from_run=run_id, at_position=at_position, model=model, prompts=prompts or {}
                )
                await store.append(f"run-{new_run}", [NewEvent.of(forked, actor="fork")], conn=conn)
    return new_run

"""A role's task queue: priority, then deadline, then arrival; one entry per task, with its newest trigger; and how
a role actor fills it, live and from the log after a restart."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from actors.agents.team.actors import TASK_STREAMS, RoleActorImpl
from actors.agents.team.queue import TaskQueue, deadline_ts
from actors.agents.team.task import Task, TaskState
from actors.config import RuntimeConfig
from actors.projections import ProjectorImpl
from events import NewEvent, RecordedEvent
from events.team import ReviewRequested, TaskCompleted, TaskCreated, TaskPriorityRaised, TaskReviewed
from storage.eventlog import EventLog


def trigger(task_id: str, position: int, type_: str = "task.created") -> RecordedEvent:
    return NewEvent(type=type_, data={"task_id": task_id}).recorded(f"task-{task_id}", position, position, tx_id=1)


async def test_high_priority_first_then_nearest_deadline_then_arrival() -> None:
    q = TaskQueue()
    q.put("low", trigger("low", 1), 10)
    q.put("medium-late", trigger("medium-late", 2), 5, "2030-01-02T00:00:00+00:00")
    q.put("medium-soon", trigger("medium-soon", 3), 5, "2030-01-01T00:00:00+00:00")
    q.put("medium-none", trigger("medium-none", 4), 5)
    q.put("high", trigger("high", 5), 1)
    order = [(await q.get())[0] for _ in range(5)]
    assert order == ["high", "medium-soon", "medium-late", "medium-none", "low"]


async def test_a_waiting_task_keeps_its_place_and_takes_the_newest_trigger() -> None:
    """A review that arrives while the task waits must not be dropped (it was, once: the task stalled)."""
    q = TaskQueue()
    assert q.put("t", trigger("t", 10, "task.review_requested"), 5)
    assert not q.put("t", trigger("t", 12, "task.reviewed"), 5)
    assert not q.put("t", trigger("t", 11, "task.assigned"), 5)  # an older trigger does not win
    assert len(q) == 1
    task_id, got = await q.get()
    assert (task_id, got.type, got.position) == ("t", "task.reviewed", 12)
    assert q.put("t", trigger("t", 13), 5)  # once taken, the task can be queued again


def event(type_: str, position: int, **data: Any) -> RecordedEvent:
    return NewEvent(type=type_, data={"run_id": "r", **data}).recorded(
        f"task-{data['task_id']}", position, position, tx_id=1
    )


def role_actor(name: str, store: EventLog | None = None) -> RoleActorImpl:
    """The role actor's queue logic without Ray."""
    actor = object.__new__(RoleActorImpl)
    actor.name, actor.queue, actor.current, actor.failures = name, TaskQueue(), None, 0
    actor.store = store  # type: ignore[assignment]
    return actor


async def test_requeue_from_the_log_keeps_raised_priorities_and_deadlines(eventlog: EventLog, db_url: str) -> None:
    """After a restart a role queues again every unfinished task it must act on, as the log has it. It folds only
    tasks that may be unfinished: the read model's unfinished ones as of the projector's checkpoint, and those
    with events after it (folding every task event ever written made a role's start as slow as the history)."""
    soon, later = "2030-01-01T00:00:00+00:00", "2030-06-01T00:00:00+00:00"

    def created(tid: str, role: str, priority: int, deadline: str | None = None) -> NewEvent:
        return NewEvent.of(
            TaskCreated(task_id=tid, run_id="r", title=tid, role=role, priority=priority, deadline=deadline)
        )

    for tid, role, priority, deadline in [
        ("low-raised", "product", 10, None),
        ("late", "product", 5, later),
        ("soon", "product", 5, soon),
        ("other-role", "cfo", 1, None),
        ("done", "product", 1, None),
    ]:
        await eventlog.append(f"task-{tid}", [created(tid, role, priority, deadline)])
    await eventlog.append(
        "task-done", [NewEvent.of(TaskCompleted(task_id="done", run_id="r", role="product", result="ok"))]
    )
    projector = ProjectorImpl(RuntimeConfig(database_url=db_url))
    projected = await eventlog.read_all(0)
    await projector.deliver(projected, projected[-1].cursor)  # read model and checkpoint cover these
    await projector.store.close()
    # after the projector's checkpoint: only in the log
    raised = TaskPriorityRaised(task_id="low-raised", run_id="r", priority=1, reason="deadline is near")
    await eventlog.append("task-low-raised", [NewEvent.of(raised)])
    review = {"task_id": "late", "run_id": "r", "role": "tech_lead", "owner": "product"}
    await eventlog.append(
        "task-late",
        [NewEvent.of(ReviewRequested(**review)), NewEvent.of(TaskReviewed(**review, approved=True, comments=""))],
    )
    folded: list[str] = []
    read_where = eventlog.read_where

    async def recording(condition: str, streams: list[str], *args: Any) -> list[RecordedEvent]:
        folded.extend(streams)
        return await read_where(condition, streams, *args)

    eventlog.read_where = recording  # type: ignore[method-assign]
    actor = role_actor("product", eventlog)
    await actor._requeue_from_log()
    order = [await actor.queue.get() for _ in range(len(actor.queue))]
    assert [(tid, trigger.type) for tid, trigger in order] == [
        ("low-raised", "task.created"),  # raised to 1 after it was created; the trigger is still its creation
        ("soon", "task.created"),
        ("late", "task.reviewed"),  # its deadline was set at creation, its latest trigger is the review
    ]
    assert "task-done" not in folded and "task-low-raised" in folded  # finished as of the read model: not read


async def test_a_raised_priority_is_not_the_tasks_result_in_the_task_list(eventlog: EventLog, db_url: str) -> None:
    """Its reason ("deadline is near") showed as the result of a running task; only an outcome sets the result."""
    created = TaskCreated(task_id="t", run_id="r", title="t", role="cfo", priority=5)
    raised = TaskPriorityRaised(task_id="t", run_id="r", priority=1, reason="deadline is near")
    projector = ProjectorImpl(RuntimeConfig(database_url=db_url))

    async def row() -> tuple[int, str | None]:
        projected = await eventlog.read_all(0)  # the projector skips what it projected before
        await projector.deliver(projected, projected[-1].cursor)
        got = await eventlog.fetch("SELECT priority, result FROM team_tasks WHERE task_id = 't'")
        return got[0]["priority"], got[0]["result"]

    try:
        await eventlog.append("task-t", [NewEvent.of(created), NewEvent.of(raised)])
        assert await row() == (1, None)
        await eventlog.append("task-t", [NewEvent.of(TaskCompleted(task_id="t", run_id="r", role="cfo", result="ok"))])
        assert await row() == (1, "ok")
    finally:
        await projector.store.close()


async def test_triggers_after_creation_keep_the_task_deadline_in_the_queue() -> None:
    """Escalations, review requests and reviews carry the task's deadline (as they carry its priority)."""
    task = Task("ceo:loop", None)  # type: ignore[arg-type]
    state = TaskState(
        task_id="t1", run_id="r", title="t", role="security", status="in_progress", timer_id="x", timeout_s=1
    )
    soon = TaskState(**{**state.model_dump(), "task_id": "t2", "deadline": "2030-01-01T00:00:00"})
    fired = event("timer.fired", 1, task_id="t1", timer_id="x", scheduled_position=0, payload={"timer_id": "x"})
    actor = role_actor("ceo")
    for s in (state, soon):  # the one without a deadline is escalated first
        assigned = next(e for e in task.on_timeout(s, fired) if e.type == "task.assigned")
        await actor.handle(event("task.assigned", 2, **assigned.data))
    assert [(await actor.queue.get())[0] for _ in range(2)] == ["t2", "t1"]


def test_a_deadline_without_a_time_zone_is_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")  # whatever the machine's local time is
    time.tzset()
    try:
        assert deadline_ts("2030-01-01T00:00:00") == deadline_ts("2030-01-01T00:00:00+00:00")
    finally:
        monkeypatch.undo()
        time.tzset()
    assert deadline_ts("2030-01-01T02:00:00+02:00") == deadline_ts("2030-01-01T00:00:00Z")
    assert deadline_ts(None) == deadline_ts("not a date") == float("inf")


async def test_a_roles_restart_reads_its_candidate_tasks_through_the_stream_index(eventlog: EventLog) -> None:
    """Not through the index on type, which would walk every task event ever written."""
    for i in range(30):
        raised = TaskPriorityRaised(task_id=f"old{i}", run_id="r", priority=1, reason="r")
        await eventlog.append(f"task-old{i}", [NewEvent.of(raised) for _ in range(100)])
    sql = f"EXPLAIN (FORMAT JSON) SELECT position FROM events WHERE {TASK_STREAMS} ORDER BY position"

    def indexes(node: dict[str, Any]) -> list[str]:
        return [node.get("Index Name", node["Node Type"]), *(i for c in node.get("Plans", []) for i in indexes(c))]

    async with eventlog.connection() as c:
        for analyze in (False, True):
            if analyze:
                await c.execute("ANALYZE events")
            [plan] = json.loads(await c.fetchval(sql, ["task-a", "task-b"]))
            used = indexes(plan["Plan"])
            assert "events_stream_version" in used and "Seq Scan" not in used and "events_type" not in used, used

"""A role's task queue: priority, then deadline, then arrival; one entry per task, with its newest trigger; and how
a role actor fills it, live and from the log after a restart."""

from __future__ import annotations

import time
from typing import Any

import pytest

from actors.agents.team.actors import RoleActorImpl
from actors.agents.team.queue import TaskQueue, deadline_ts
from actors.agents.team.task import Task, TaskState
from events import NewEvent, RecordedEvent


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


class LogStub:
    """``read_all`` over a list of events, as the event log pages it."""

    def __init__(self, events: list[RecordedEvent]) -> None:
        self.events = events

    async def read_all(self, from_position: int = 0, *, types: Any = None, limit: int = 1000) -> list[RecordedEvent]:
        found = [e for e in self.events if e.position > from_position and (types is None or e.type in types)]
        return found[:limit]


def role_actor(name: str, events: list[RecordedEvent] | None = None) -> RoleActorImpl:
    """The role actor's queue logic without Ray or a database."""
    actor = object.__new__(RoleActorImpl)
    actor.name, actor.queue, actor.current, actor.failures = name, TaskQueue(), None, 0
    actor.store = LogStub(events or [])  # type: ignore[assignment]
    return actor


async def test_requeue_from_the_log_keeps_raised_priorities_and_deadlines() -> None:
    soon, later = "2030-01-01T00:00:00+00:00", "2030-06-01T00:00:00+00:00"
    actor = role_actor(
        "product",
        [
            event("task.created", 1, task_id="low-raised", role="product", priority=10),
            event("task.created", 2, task_id="late", role="product", priority=5, deadline=later),
            event("task.created", 3, task_id="soon", role="product", priority=5, deadline=soon),
            event("task.created", 4, task_id="other-role", role="cfo", priority=1),
            event("task.created", 5, task_id="done", role="product", priority=1),
            event("task.completed", 6, task_id="done", role="product", result="ok"),
            event("task.priority_raised", 7, task_id="low-raised", priority=1, reason="deadline is near"),
            event("task.review_requested", 8, task_id="late", role="tech_lead", owner="product", priority=5),
            event("task.reviewed", 9, task_id="late", role="tech_lead", owner="product", approved=True, comments=""),
        ],
    )
    await actor._requeue_from_log()
    order = [await actor.queue.get() for _ in range(len(actor.queue))]
    assert [(tid, trigger.type) for tid, trigger in order] == [
        ("low-raised", "task.created"),  # raised to 1 after it was created; the trigger is still its creation
        ("soon", "task.created"),
        ("late", "task.reviewed"),  # its deadline was set at creation, its latest trigger is the review
    ]


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

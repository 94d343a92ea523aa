"""A role's task queue: priority, then deadline, then arrival; one entry per task, with its newest trigger."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

from actors.agents.team.queue import TaskQueue
from events import Meta, RecordedEvent


def trigger(task_id: str, position: int, type_: str = "task.created") -> RecordedEvent:
    return RecordedEvent(
        id=uuid4(),
        stream=f"task-{task_id}",
        version=position,
        position=position,
        tx_id=1,
        type=type_,
        data={"task_id": task_id},
        meta=Meta(),
        recorded_at=datetime.now(UTC),
    )


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

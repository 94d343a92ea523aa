"""A role's work queue: priority first (1 = high), then the nearest deadline, then arrival; one entry per task."""

from __future__ import annotations

import asyncio
import itertools
import math
from datetime import UTC, datetime

from events import RecordedEvent


def deadline_ts(value: str | None) -> float:
    """A deadline as a timestamp; one without a time zone is UTC (as ``events.team.as_utc`` reads it)."""
    if not value:
        return math.inf
    try:
        when = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return math.inf
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


class TaskQueue:
    def __init__(self) -> None:
        self._q: asyncio.PriorityQueue[tuple[int, float, int, str]] = asyncio.PriorityQueue()
        self._latest: dict[str, RecordedEvent] = {}
        self._seq = itertools.count()

    def put(self, task_id: str, trigger: RecordedEvent, priority: int, deadline: str | None = None) -> bool:
        """Queue a task once. A task already waiting keeps its place but takes the newer trigger, so the worker
        catches up with everything that happened to the task meanwhile (a review that came in, say)."""
        queued = task_id in self._latest
        if not queued or trigger.position > self._latest[task_id].position:
            self._latest[task_id] = trigger
        if queued:
            return False
        self._q.put_nowait((priority, deadline_ts(deadline), next(self._seq), task_id))
        return True

    async def get(self) -> tuple[str, RecordedEvent]:
        _, _, _, task_id = await self._q.get()
        return task_id, self._latest.pop(task_id)

    def __len__(self) -> int:
        return self._q.qsize()

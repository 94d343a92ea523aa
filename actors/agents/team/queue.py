"""A role's work queue: priority first (1 = high), then the nearest deadline, then arrival; one entry per task."""

from __future__ import annotations

import asyncio
import itertools
import math
from datetime import datetime

from events import RecordedEvent


def deadline_ts(value: str | None) -> float:
    if not value:
        return math.inf
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return math.inf


class TaskQueue:
    def __init__(self) -> None:
        self._q: asyncio.PriorityQueue[tuple[int, float, int, str, RecordedEvent]] = asyncio.PriorityQueue()
        self._queued: set[str] = set()
        self._seq = itertools.count()

    def put(self, task_id: str, trigger: RecordedEvent, priority: int, deadline: str | None = None) -> bool:
        """Queue a task once; a task already waiting keeps its place (its next step is read from the log)."""
        if task_id in self._queued:
            return False
        self._queued.add(task_id)
        self._q.put_nowait((priority, deadline_ts(deadline), next(self._seq), task_id, trigger))
        return True

    async def get(self) -> tuple[str, RecordedEvent]:
        _, _, _, task_id, trigger = await self._q.get()
        self._queued.discard(task_id)
        return task_id, trigger

    def __len__(self) -> int:
        return self._q.qsize()

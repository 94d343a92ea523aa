"""A subscriber's deliveries in flight, in the order they were sent.

An entity actor returns a delivery as soon as its own events are handled, so deliveries may finish out of order
(a slow chat in the first, quick ones in the second). The handled cursor, which becomes the checkpoint, moves past
a delivery only once it and every delivery sent before it are done."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from storage.eventlog import Cursor


@dataclass
class Delivery:
    end: Cursor
    done: bool = False


class InFlight:
    def __init__(self) -> None:
        self._sent: deque[Delivery] = deque()

    def __len__(self) -> int:
        return len(self._sent)

    def sent(self, end: Cursor) -> Delivery:
        d = Delivery(end)
        self._sent.append(d)
        return d

    def finished(self, d: Delivery) -> Cursor | None:
        """Mark ``d`` done; returns the new handled cursor if it moved."""
        d.done = True
        moved = None
        while self._sent and self._sent[0].done:
            moved = self._sent.popleft().end
        return moved

    def clear(self) -> None:
        """Forget them all (a rewind): what they would report is read and delivered again."""
        self._sent.clear()

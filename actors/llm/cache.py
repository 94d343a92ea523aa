"""The LLM actor's response cache: an identical request within the TTL is answered without calling a provider."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from actors.llm.base import Completion


class CompletionCache:
    """LRU-bounded, TTL-expiring map from ``request.digest()`` to the completion; in memory, per process.

    It is a cost saver, not a record: the durable answer is the ``llm.completed`` event the caller writes."""

    def __init__(
        self, ttl_s: float = 3600.0, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, Completion]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Completion | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        expires, completion = entry
        if self.clock() >= expires:
            del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return completion

    def put(self, key: str, completion: Completion) -> None:
        if self.ttl_s <= 0 or self.max_entries <= 0:
            return
        self._entries[key] = (self.clock() + self.ttl_s, completion)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def stats(self) -> dict[str, int]:
        return {"size": len(self._entries), "hits": self.hits, "misses": self.misses}

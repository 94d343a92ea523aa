"""The LLM actor's response cache: an identical request within the TTL is answered without calling a provider."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from actors.llm.base import Completion


class CompletionCache:
    """LRU-bounded, TTL-expiring map from ``request.digest()`` to the completion; in memory, per process.

    It is a cost saver, not a record: the durable answer is the ``llm.completed`` event the caller writes. Each
    entry keeps the completion as the provider answered it (its cost and usage) and the ``record_key`` of the
    request that paid for it (see ``LLMRouter.complete``)."""

    def __init__(
        self, ttl_s: float = 3600.0, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, Completion, str | None]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Completion | None:
        entry = self.get_entry(key)
        return entry[0] if entry is not None else None

    def get_entry(self, key: str) -> tuple[Completion, str | None] | None:
        """The cached completion and the ``record_key`` of the request that paid for it."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        expires, completion, paid_by = entry
        if self.clock() >= expires:
            del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return completion, paid_by

    def put(self, key: str, completion: Completion, paid_by: str | None = None) -> None:
        if self.ttl_s <= 0 or self.max_entries <= 0:
            return
        self._entries[key] = (self.clock() + self.ttl_s, completion, paid_by)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def stats(self) -> dict[str, int]:
        return {"size": len(self._entries), "hits": self.hits, "misses": self.misses}

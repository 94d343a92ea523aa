"""Spending limits: what has been spent is summed from the ``llm.completed`` events, so it survives restarts."""

from __future__ import annotations

from typing import Any, Literal

from actors.llm.base import ProviderError
from events import NewEvent
from events.hub import LLMCompleted
from storage.eventlog import EventLog


class BudgetExceededError(ProviderError):
    """No more provider calls for this run or agent: its completions already cost its budget."""

    def __init__(self, scope: str, spent: float, budget: float, message: str | None = None) -> None:
        super().__init__(message or f"{scope} budget exceeded: spent ${spent:.4f} of ${budget:.4f}")
        self.scope, self.spent, self.budget = scope, spent, budget

    def __reduce__(self) -> tuple[Any, ...]:
        # The default rebuilds an exception from ``args`` (the message only), which this ``__init__`` cannot take:
        # it must cross Ray (a role's verdict, the LLM actor) intact.
        return type(self), (self.scope, self.spent, self.budget, str(self)), self.__dict__


def spending_sql(by: Literal["run_id", "agent_id"]) -> str:
    """The sum behind a budget; migration 0005 indexes both forms. An agent's is its chats' completions only: a
    team's record the role as ``agent_id`` (with their ``run_id``), which a hub agent may be named too."""
    team = " AND data->>'run_id' IS NULL" if by == "agent_id" else ""
    return (
        "SELECT coalesce(sum((data->>'cost_usd')::float), 0) FROM events "
        f"WHERE type = 'llm.completed' AND data->>'{by}' = $1{team}"
    )


async def spent_usd(store: EventLog, by: Literal["run_id", "agent_id"], value: str) -> float:
    """The cost recorded by every completion of one run or one agent."""
    return float(await store.fetchval(spending_sql(by), value))


def paid_without_text(decided: list[NewEvent]) -> list[NewEvent]:
    """The completions of a decision that never reached the log (it refused the answer: over the size limit, a NUL
    character; or the handling crashed after the provider answered), without their text: the provider was paid,
    and budgets sum the cost of the ``llm.completed`` events."""
    return [
        NewEvent.of(LLMCompleted.model_validate({**e.data, "text": "", "structured": None}))
        for e in decided
        if e.type == "llm.completed"
    ]

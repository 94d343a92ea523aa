"""Spending is summed from the ``llm.completed`` events of a run or an agent, through an index as the log grows."""

from __future__ import annotations

import pytest

from actors.llm.budget import spending_sql, spent_usd
from events import NewEvent
from events.hub import LLMCompleted
from storage.eventlog import EventLog


def completion(agent: str, run: str | None, cost: float) -> NewEvent:
    return NewEvent.of(
        LLMCompleted(
            agent_id=agent,
            run_id=run,
            provider="scripted",
            model="gpt-4o-mini",
            text="ok",
            prompt_tokens=3,
            completion_tokens=1,
            total_tokens=4,
            latency_ms=0.1,
            cost_usd=cost,
            request_hash="h",
        )
    )


async def test_spending_sums_the_recorded_costs(eventlog: EventLog) -> None:
    await eventlog.append("chat-a1/x", [completion("a1", None, 0.5), completion("a1", None, 0.25)])
    await eventlog.append("task-r1.t", [completion("cfo", "r1", 1.0), completion("qa", "r1", 0.125)])
    assert await spent_usd(eventlog, "agent_id", "a1") == pytest.approx(0.75)
    assert await spent_usd(eventlog, "run_id", "r1") == pytest.approx(1.125)
    assert await spent_usd(eventlog, "agent_id", "nobody") == 0.0


async def test_an_agent_named_like_a_role_is_not_charged_for_the_team(eventlog: EventLog) -> None:
    """A team's completions record the role as ``agent_id``: a hub agent called ``developer`` pays only its own."""
    await eventlog.append("chat-developer/x", [completion("developer", None, 0.5)])
    await eventlog.append("task-r1.t", [completion("developer", "r1", 2.0)])
    assert await spent_usd(eventlog, "agent_id", "developer") == pytest.approx(0.5)
    assert await spent_usd(eventlog, "run_id", "r1") == pytest.approx(2.0)


@pytest.mark.parametrize(("by", "index"), [("agent_id", "events_llm_agent"), ("run_id", "events_llm_run")])
async def test_the_spending_query_can_use_its_index(eventlog: EventLog, by: str, index: str) -> None:
    async with eventlog.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")  # a tiny table: make the planner show its options
        plan = await conn.fetch("EXPLAIN " + spending_sql(by), "x")  # type: ignore[arg-type]
    assert index in "\n".join(r[0] for r in plan)

"""The ingress's reply waiter: every request waiting for a reply gets it, and giving up is per request."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from events import ANY, NewEvent
from events.hub import AgentStarted, ReplySent
from serve.replies import ReplyWaiter
from storage.errors import StoreUnavailable
from storage.eventlog import EventLog
from tests.conftest import count_calls


async def reply_to(eventlog: EventLog, cid: str, correlation: str | None = None) -> NewEvent:
    """Append the agent's reply to the message ``cid`` (its causation; its correlation is the message's own)."""
    reply = NewEvent.of(ReplySent(agent_id="a", chat_id="c", response=f"to {cid}", channel="api"), actor="test")
    reply.meta.causation_id = uuid.UUID(cid)
    reply.meta.correlation_id = uuid.UUID(correlation or cid)
    await eventlog.append("chat-a/c", [reply], ANY)
    return reply


async def test_every_request_waiting_for_one_reply_gets_it(eventlog: EventLog) -> None:
    """Concurrent retries of one idempotent request all wait for the original message's reply; one of them
    giving up (its timeout) must not cancel or steal the others' wait."""
    waiter = ReplyWaiter(eventlog, poll_interval=0.5)
    await waiter.start()
    try:
        cid = str(uuid.uuid4())
        first, second, gave_up = [await waiter.expect(cid) for _ in range(3)]
        waiter.forget(cid, gave_up)
        assert gave_up.cancelled() and not first.done() and not second.done()

        reply = await reply_to(eventlog, cid)
        got = await asyncio.wait_for(asyncio.gather(first, second), 5)

        assert [e.id for e in got] == [reply.id, reply.id] and got[0].data["response"] == f"to {cid}"
        waiter.forget(cid, first)  # after the reply: a no-op
        assert first.result().id == reply.id and waiter.pending == {}
    finally:
        await waiter.close()


async def test_a_reply_goes_to_the_request_of_the_message_that_caused_it(eventlog: EventLog) -> None:
    """Not by correlation id: a message appended through the raw events API may carry another waiting message's
    as its own, and its reply answered that message's request."""
    waiter = ReplyWaiter(eventlog, poll_interval=0.5)
    await waiter.start()
    try:
        waiting, forged = str(uuid.uuid4()), str(uuid.uuid4())
        fut = await waiter.expect(waiting)
        await reply_to(eventlog, forged, correlation=waiting)
        mine = await reply_to(eventlog, waiting)
        assert (await asyncio.wait_for(fut, 5)).id == mine.id
    finally:
        await waiter.close()


async def test_after_an_idle_spell_the_follower_moves_to_the_head_instead_of_catching_up(
    eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While nobody waits the follower reads nothing; 3,000 events written meanwhile would cost the next request
    six reads of 500 before its reply could be seen. It moves to the head first, and still gets the reply."""
    waiter = ReplyWaiter(eventlog, poll_interval=0.5, idle_restart_s=0)
    await waiter.start()
    try:
        for i in range(6):
            await eventlog.append(f"agent-busy{i}", [NewEvent.of(AgentStarted()) for _ in range(500)])
        reads = count_calls(monkeypatch, eventlog, "read_committed")
        cid = str(uuid.uuid4())
        fut = await waiter.expect(cid)
        reply = await reply_to(eventlog, cid)
        assert (await asyncio.wait_for(fut, 5)).id == reply.id
        assert len(reads) <= 3  # the reply's batch and a look for more; not the 3,000 events before it
    finally:
        await waiter.close()


async def test_a_start_while_the_database_is_down_fails_at_once_and_a_later_one_works(
    eventlog: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica opens its connections on a request; if the head cannot be read, that request gets its 503 at
    once and the next one opens again (the start used to wait, holding every request, while the follower retried)."""
    head_cursor = eventlog.head_cursor

    async def down() -> Any:
        raise StoreUnavailable("event store unavailable: connection refused")

    monkeypatch.setattr(eventlog, "head_cursor", down)
    waiter = ReplyWaiter(eventlog, poll_interval=0.5)
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(waiter.start(), 2)
    monkeypatch.setattr(eventlog, "head_cursor", head_cursor)
    await asyncio.wait_for(waiter.start(), 5)
    try:
        cid = str(uuid.uuid4())
        fut = await waiter.expect(cid)
        reply = await reply_to(eventlog, cid)
        assert (await asyncio.wait_for(fut, 5)).id == reply.id
    finally:
        await waiter.close()

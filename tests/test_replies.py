"""The ingress's reply waiter: every request waiting for a reply gets it, and giving up is per request."""

from __future__ import annotations

import asyncio
import uuid

from events import ANY, NewEvent
from events.hub import ReplySent
from serve.replies import ReplyWaiter
from storage.eventlog import EventLog


async def test_every_request_waiting_for_one_reply_gets_it(eventlog: EventLog) -> None:
    """Concurrent retries of one idempotent request all wait for the original message's reply; one of them
    giving up (its timeout) must not cancel or steal the others' wait."""
    waiter = ReplyWaiter(eventlog, poll_interval=0.5)
    await waiter.start()
    try:
        cid = str(uuid.uuid4())
        first, second, gave_up = waiter.expect(cid), waiter.expect(cid), waiter.expect(cid)
        waiter.forget(cid, gave_up)
        assert gave_up.cancelled() and not first.done() and not second.done()

        reply = NewEvent.of(ReplySent(agent_id="a", chat_id="c", response="done", channel="api"), actor="test")
        reply.meta.correlation_id = uuid.UUID(cid)
        await eventlog.append("chat-a/c", [reply], ANY)
        got = await asyncio.wait_for(asyncio.gather(first, second), 5)

        assert [e.id for e in got] == [reply.id, reply.id] and got[0].data["response"] == "done"
        waiter.forget(cid, first)  # after the reply: a no-op
        assert first.result().id == reply.id and waiter.pending == {}
    finally:
        await waiter.close()

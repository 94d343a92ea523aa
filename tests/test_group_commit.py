"""Group commit: concurrent appends of one process share a transaction, and each keeps its own outcome."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from events import ANY, NO_STREAM, NewEvent
from events.hub import AgentStarted
from storage.errors import InvalidEvent, WrongExpectedVersion
from storage.eventlog import AppendResult, EventLog


def started() -> NewEvent:
    return NewEvent.of(AgentStarted())


async def test_concurrent_appends_share_batches_and_get_their_own_positions(eventlog: EventLog) -> None:
    before = eventlog.group.batches
    results = await asyncio.gather(*(eventlog.append(f"agent-g{i % 5}", [started(), started()]) for i in range(40)))
    assert eventlog.group.batches - before < 40  # they did share
    positions = [p for r in results for p in r.positions]
    assert len(set(positions)) == 80
    for i in range(5):  # each stream has its eight appends as versions 1..16, in the order they were made
        events = await eventlog.read_stream(f"agent-g{i}")
        assert [e.version for e in events] == list(range(1, 17))
        mine = [r for k, r in enumerate(results) if k % 5 == i]
        assert [v for r in mine for v in r.versions] == list(range(1, 17))


async def test_a_wrong_version_fails_alone_in_its_batch(eventlog: EventLog) -> None:
    await eventlog.append("agent-held", [started()], NO_STREAM)
    calls = [
        eventlog.append("agent-first", [started()]),
        eventlog.append("agent-ok1", [started()], NO_STREAM),
        eventlog.append("agent-held", [started()], 7),
        eventlog.append("agent-ok2", [started()], ANY),
        eventlog.append("agent-held", [started()], 1),  # right after the wrong one, in the same batch
    ]
    before = eventlog.group.batches
    first, ok1, wrong, ok2, held = await asyncio.gather(*calls, return_exceptions=True)
    assert eventlog.group.batches - before == 1  # all five were queued before the batch went: one transaction
    assert isinstance(wrong, WrongExpectedVersion) and wrong.actual == 1
    assert all(isinstance(r, AppendResult) for r in (first, ok1, ok2, held))
    assert isinstance(held, AppendResult) and held.versions == [2]
    assert [e.version for e in await eventlog.read_stream("agent-held")] == [1, 2]


async def test_a_retried_command_in_a_batch_gets_the_original_positions(eventlog: EventLog) -> None:
    original = await eventlog.append("agent-idem", [started(), started()], idempotency_key="cmd-1")
    again, other = await asyncio.gather(
        eventlog.append("agent-idem", [started(), started()], idempotency_key="cmd-1"),
        eventlog.append("agent-idem", [started()]),
    )
    assert again.replayed and again.positions == original.positions
    assert not other.replayed and other.versions == [3]


async def test_a_batch_broken_by_one_append_runs_the_others_alone(eventlog: EventLog) -> None:
    dup = started()
    await eventlog.append("agent-dup", [dup])
    results = await asyncio.gather(
        eventlog.append("agent-x", [started()]),
        eventlog.append("agent-y", [started()]),
        eventlog.append("agent-dup", [NewEvent(id=dup.id, type=dup.type, data=dup.data)]),  # the same event id
        eventlog.append("agent-z", [started()]),
        return_exceptions=True,
    )
    assert isinstance(results[2], asyncpg.UniqueViolationError)
    assert all(isinstance(r, AppendResult) for k, r in enumerate(results) if k != 2)
    for stream in ("agent-x", "agent-y", "agent-z"):
        assert len(await eventlog.read_stream(stream)) == 1
    assert len(await eventlog.read_stream("agent-dup")) == 1


async def test_an_append_in_a_callers_transaction_is_not_batched(eventlog: EventLog) -> None:
    before = eventlog.group.batches
    async with eventlog.connection() as conn, conn.transaction():
        await eventlog.append("agent-tx", [started()], conn=conn)
    assert eventlog.group.batches == before
    with pytest.raises(WrongExpectedVersion):
        await eventlog.append("agent-tx", [started()], NO_STREAM)


async def test_an_append_the_log_cannot_store_fails_alone_and_breaks_no_batch(eventlog: EventLog) -> None:
    before = eventlog.group.batches
    results = await asyncio.gather(
        eventlog.append("agent-v1", [started()]),
        eventlog.append("agent-v2", [NewEvent.of(AgentStarted(), actor="api\x00")]),  # jsonb cannot hold U+0000
        eventlog.append("agent-v3", [started()], idempotency_key="k\x00"),
        eventlog.append("agent-v4", [started()]),
        return_exceptions=True,
    )
    assert isinstance(results[1], InvalidEvent) and isinstance(results[2], InvalidEvent)
    assert eventlog.group.batches - before == 1
    written = {e.stream: e.tx_id for e in await eventlog.read_all()}
    assert set(written) == {"agent-v1", "agent-v4"}
    assert written["agent-v1"] == written["agent-v4"]  # one transaction, not rerun alone after a failed batch

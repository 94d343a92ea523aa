"""Per-stream order in subscriptions: commit order (tx_id, position) must agree with version order in every stream.

A transaction gets its id at its first write, not at its commit. An append that got its id and then waited for a
stream held by a younger transaction used to write the later version under the older id, so subscribers saw v2
before v1. Appends now take a lock on each of their streams (in a fixed order) before their first write.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import asyncpg
import pytest

from events import NewEvent, RecordedEvent
from events.hub import AgentStarted
from storage.errors import StreamsNotLocked, WrongExpectedVersion
from storage.eventlog import START, AppendResult, Checkpoint, EventLog
from tests.conftest import eventually


def started() -> NewEvent:
    return NewEvent.of(AgentStarted())


async def _waiting_on_locks(eventlog: EventLog, n: int) -> bool:
    waiting = await eventlog.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return int(waiting) >= n


async def _in_commit_order(eventlog: EventLog) -> list[RecordedEvent]:
    seen: list[RecordedEvent] = []
    cursor = START
    while True:
        batch = await eventlog.read_committed(cursor)
        if batch.cursor == cursor:
            return seen
        seen += batch.events
        cursor = batch.cursor


def _versions_by_stream(events: list[RecordedEvent]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for e in events:
        out[e.stream].append(e.version)
    return dict(out)


async def _subscribed(eventlog: EventLog, count: int) -> list[RecordedEvent]:
    seen: list[RecordedEvent] = []
    async for batch, _ in eventlog.subscribe(START, poll_interval=0.1):
        seen += batch
        if len(seen) >= count:
            return seen
    raise AssertionError("unreachable")


async def _settle(task: asyncio.Task[object], eventlog: EventLog, waiters: int) -> None:
    """Wait until ``task`` finished or is one of ``waiters`` sessions waiting on a lock."""

    async def settled() -> bool:
        return task.done() or await _waiting_on_locks(eventlog, waiters)

    await eventually(settled, 10, "the append to finish or wait on a lock")


async def _hold_until(eventlog: EventLog, condition_sql: str) -> None:
    async def holds() -> bool:
        return bool(await eventlog.fetchval(f"SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE {condition_sql})"))

    await eventually(holds, 10, condition_sql)


async def test_a_batch_waiting_on_one_stream_cannot_write_another_behind_a_younger_append(eventlog: EventLog) -> None:
    """The batch's exact-version update of agent-a waits for a row lock with its transaction id already assigned
    (an UPDATE takes one before it waits); meanwhile a younger transaction appends chat-x v1 and commits; then the
    batch writes chat-x v2."""
    await eventlog.append("agent-a", [started()])
    async with eventlog.connection() as holder:
        tx = holder.transaction()
        await tx.start()
        await eventlog.append("agent-a", [started()], conn=holder)  # holds agent-a at v2, not committed yet
        before = eventlog.group.batches
        batch = asyncio.ensure_future(
            asyncio.gather(
                eventlog.append("agent-a", [started()], 1),
                eventlog.append("chat-x", [started()]),
                return_exceptions=True,
            )
        )
        await eventually(lambda: _waiting_on_locks(eventlog, 1), 10, "the batch to wait for agent-a")
        younger = asyncio.ensure_future(eventlog.append("chat-x", [started()]))
        await _settle(younger, eventlog, 2)
        await tx.commit()
    conflict, appended = await asyncio.wait_for(batch, 10)
    await asyncio.wait_for(younger, 10)
    assert isinstance(conflict, WrongExpectedVersion) and conflict.actual == 2
    assert isinstance(appended, AppendResult) and appended.versions == [2]
    assert eventlog.group.batches - before == 2  # the batch of two, and the younger append alone

    expected = {"agent-a": [1, 2], "chat-x": [1, 2]}
    assert _versions_by_stream(await _in_commit_order(eventlog)) == expected
    assert _versions_by_stream(await _subscribed(eventlog, 4)) == expected


async def test_a_slow_first_write_of_a_batch_cannot_put_its_second_stream_behind_a_younger_append(
    eventlog: EventLog,
) -> None:
    """The design's example: a batch writes agent-b (its transaction id is assigned there), a younger transaction
    appends chat-w v1 and commits before the batch reaches chat-w, the batch writes chat-w v2. A trigger makes the
    first write slow so the younger append reliably comes in between."""
    await eventlog.execute(
        "CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.5); "
        "RETURN NEW; END $$; CREATE TRIGGER slow AFTER INSERT ON events FOR EACH ROW "
        "WHEN (NEW.stream = 'agent-b') EXECUTE FUNCTION slow_write()"
    )
    batch = asyncio.ensure_future(
        asyncio.gather(eventlog.append("agent-b", [started()]), eventlog.append("chat-w", [started()]))
    )
    await _hold_until(eventlog, "wait_event = 'PgSleep' AND backend_xid IS NOT NULL")
    younger = asyncio.ensure_future(eventlog.append("chat-w", [started()]))
    await asyncio.wait_for(asyncio.gather(batch, younger), 10)
    assert _versions_by_stream(await _in_commit_order(eventlog)) == {"agent-b": [1], "chat-w": [1, 2]}


async def test_an_append_with_a_checkpoint_cannot_write_its_stream_behind_a_younger_append(
    eventlog: EventLog,
) -> None:
    """The checkpoint used to be written first, assigning the transaction id before the stream was held."""
    await eventlog.execute(
        "CREATE FUNCTION slow_checkpoint() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.5); "
        "RETURN NEW; END $$; CREATE TRIGGER slow AFTER INSERT OR UPDATE ON checkpoints FOR EACH ROW "
        "EXECUTE FUNCTION slow_checkpoint()"
    )
    with_checkpoint = asyncio.ensure_future(
        eventlog.append("chat-y", [started()], checkpoint=Checkpoint("sub-1", (3, 3)))
    )
    await _hold_until(eventlog, "wait_event = 'PgSleep' AND backend_xid IS NOT NULL")
    younger = asyncio.ensure_future(eventlog.append("chat-y", [started()]))
    await asyncio.wait_for(asyncio.gather(with_checkpoint, younger), 10)
    assert _versions_by_stream(await _in_commit_order(eventlog)) == {"chat-y": [1, 2]}
    assert await eventlog.load_checkpoint("sub-1") == (3, 3)


async def test_many_concurrent_batches_keep_every_stream_in_version_order(eventlog: EventLog, db_url: str) -> None:
    """Two processes' group commits and single appends on overlapping streams: no inversion, no deadlock."""
    other = await EventLog.connect(db_url, max_size=4, run_migrations=False)
    try:
        streams = [f"chat-{k}" for k in range(6)]

        async def writer(log: EventLog, seed: int) -> None:
            for i in range(30):
                await asyncio.gather(*(log.append(streams[(seed + i + j) % 6], [started()]) for j in range(4)))

        await asyncio.gather(*(writer(log, s) for s in range(4) for log in (eventlog, other)))
    finally:
        await other.close()
    by_stream = _versions_by_stream(await _in_commit_order(eventlog))
    assert sum(len(v) for v in by_stream.values()) == 8 * 30 * 4
    for stream, versions in by_stream.items():
        assert versions == list(range(1, len(versions) + 1)), stream


async def test_appends_assign_no_transaction_id_before_they_hold_their_streams(db_url: str) -> None:
    """The premise of the fix: a transaction-level advisory lock assigns no transaction id (a row lock would)."""
    conn = await asyncpg.connect(db_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(1, hashtext('chat-z'))")
            assert await conn.fetchval("SELECT pg_current_xact_id_if_assigned()") is None
    finally:
        await conn.close()


async def test_a_caller_transaction_that_wrote_first_must_hold_its_streams(eventlog: EventLog) -> None:
    """The invariant is checked, not only documented: an append in a transaction that already has its id, to a
    stream it does not hold, is refused and writes nothing."""
    async with eventlog.connection() as conn:
        with pytest.raises(StreamsNotLocked, match="lock_streams"):
            async with conn.transaction():
                await eventlog.append("chat-first", [started()], conn=conn)  # the first write: it takes its lock
                await eventlog.append("chat-second", [started()], conn=conn)  # the id is assigned; no lock held
        assert await eventlog.read_stream("chat-first") == []  # the caller's transaction rolled back
        with pytest.raises(StreamsNotLocked, match="lock_streams came after"):
            async with conn.transaction():
                await eventlog.append("chat-first", [started()], conn=conn)
                await eventlog.lock_streams(conn, ["chat-first"])  # held already: fine
                await eventlog.lock_streams(conn, ["chat-second"])  # too late: the id is assigned
        assert await eventlog.read_stream("chat-first") == []

        streams = [f"chat-s{i}" for i in range(20)]  # hashes of both signs: the lock check maps each right
        async with conn.transaction():
            await eventlog.lock_streams(conn, streams)
            for stream in [*streams, streams[0]]:
                await eventlog.append(stream, [started()], conn=conn)
    assert (
        await eventlog.fetchval("SELECT count(DISTINCT sign(hashtext(s))) FROM unnest($1::text[]) AS s", streams) == 2
    )
    expected = {s: [1] for s in streams} | {streams[0]: [1, 2]}
    assert _versions_by_stream(await _in_commit_order(eventlog)) == expected

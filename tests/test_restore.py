"""A log dumped with pg_dump and restored into another Postgres cluster keeps delivering, from every stored cursor."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from events import NewEvent
from events.hub import AgentStarted
from storage import restored as restored_module
from storage.embedded import EmbeddedPostgres, find_bin_dir
from storage.eventlog import START, Cursor, EventLog, RecordedEvent
from storage.migrate import migrate
from tests.conftest import free_port

TIMERS = "orchestrator-timers"  # a snapshot that holds a cursor, as the orchestrator's timers do


async def _burn_transaction_ids(conn: asyncpg.Connection, n: int) -> None:
    """Use up ``n`` transaction ids (a subtransaction that writes takes one): a cluster that has run for a while."""
    async with conn.transaction():
        await conn.execute("CREATE TEMPORARY TABLE burn (n int) ON COMMIT DROP")
        await conn.execute(
            f"DO $$ BEGIN FOR i IN 1..{n} LOOP BEGIN INSERT INTO burn VALUES (i); "
            "EXCEPTION WHEN OTHERS THEN RAISE; END; END LOOP; END $$"
        )


async def _append_in(conn: asyncpg.Connection, stream: str) -> None:
    """One append on ``conn``, in the transaction the caller holds open there."""
    await conn.fetch(
        "SELECT * FROM agenthub_append($1, 'any', 0, $2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[], "
        "NULL, NULL, NULL, NULL, true)",
        stream,
        [NewEvent.of(AgentStarted()).id],
        ["agent.started"],
        ["{}"],
        ['{"schema_version": 1}'],
    )


async def _xmax(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        xmax: int = await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        return xmax
    finally:
        await conn.close()


@pytest.fixture
async def source(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedPostgres, EventLog]]:
    """A cluster of its own, new: its first events have transaction ids a restored cluster also reaches."""
    pg = EmbeddedPostgres(tmp_path / "source", free_port())
    await asyncio.to_thread(pg.start)
    log = await EventLog.connect(pg.url)
    try:
        yield pg, log
    finally:
        await log.close()
        pg.stop("immediate")


async def _dumped_and_restored(url: str, tmp_path: Path) -> EmbeddedPostgres:
    """``pg_dump`` of the database at ``url`` restored with ``psql`` into a new cluster, running."""
    dump = tmp_path / "log.sql"
    bin_dir = find_bin_dir()
    pg_dump = [str(bin_dir / "pg_dump"), "--no-owner", "--no-privileges", "-f", str(dump), url]
    await asyncio.to_thread(subprocess.run, pg_dump, check=True)
    target = EmbeddedPostgres(tmp_path / "restored", free_port())
    await asyncio.to_thread(target.start)
    psql = [str(bin_dir / "psql"), "-q", "-v", "ON_ERROR_STOP=1", "-f", str(dump), target.url]
    await asyncio.to_thread(subprocess.run, psql, check=True, capture_output=True)
    return target


async def _after(log: EventLog, name: str) -> list[RecordedEvent]:
    """What a subscriber named ``name`` is delivered next: after its checkpoint, or after the timers' cursor."""
    if name == TIMERS:
        snapshot = await log.load_snapshot(TIMERS)
        assert snapshot is not None
        cursor: Cursor = (int(snapshot[1]["cursor"][0]), int(snapshot[1]["cursor"][1]))
    else:
        cursor = await log.load_checkpoint(name)
    return (await log.read_committed(cursor, limit=5000)).events


async def test_a_restored_log_resumes_every_cursor_exactly(
    source: tuple[EmbeddedPostgres, EventLog], tmp_path: Path
) -> None:
    """The dump keeps each event's transaction id, the old cluster's; the new cluster counts its own, and here its
    count falls between the old log's ids. As restored, the later events were never delivered and new events sorted
    before the checkpoints that had seen them; at start every event is rebased."""
    pg, log = source
    await log.append("agent-a", [NewEvent.of(AgentStarted()) for _ in range(2)])  # early: low ids
    async with log.connection() as c:
        await _burn_transaction_ids(c, 3000)  # the old cluster ran on for a while
    # a commit order unlike the position order: a transaction takes its id, later ones append and commit, then it
    # appends (a higher position, a lower transaction id)
    slow = await asyncpg.connect(pg.url)
    async with slow.transaction():
        await slow.fetchval("SELECT pg_current_xact_id()")
        for _ in range(3):
            await log.append("agent-a", [NewEvent.of(AgentStarted())])
        await _append_in(slow, "agent-slow")
    await slow.close()
    await log.append("agent-b", [NewEvent.of(AgentStarted()) for _ in range(2)])
    old = sorted(await log.read_all(), key=lambda e: e.cursor)  # commit order
    assert [e.position for e in old] != sorted(e.position for e in old)
    cuts: dict[str, Cursor] = {f"after-{i}": old[i - 1].cursor for i in range(1, len(old) + 1)}
    cuts |= {"none-yet": START, "twin-of-after-3": old[2].cursor}  # two subscribers at one place
    await log.save_checkpoints(cuts)
    cuts[TIMERS] = old[4].cursor
    await log.save_snapshot(TIMERS, 1, {"cursor": list(old[4].cursor), "armed": []})

    target = await _dumped_and_restored(pg.url, tmp_path)
    try:
        xmax = await _xmax(target.url)
        assert min(e.tx_id for e in old) < xmax <= max(e.tx_id for e in old)  # the old ids straddle the new count
        restored = await EventLog.connect(target.url, run_migrations=False)  # as restored, before any start
        try:
            delivered = await _after(restored, "none-yet")
            assert 0 < len(delivered) < len(old)  # the events below the new count only
            last = await restored.load_checkpoint(f"after-{len(old)}")
            async with restored.connection() as c, c.transaction():  # a new event would sort below the checkpoint
                assert await c.fetchval("SELECT pg_current_xact_id()::text::bigint") < last[0]
        finally:
            await restored.close()

        restored = await EventLog.connect(target.url)  # a start: migrations, then the rebase
        try:
            new = await restored.append("agent-new", [NewEvent.of(AgentStarted())])
            for name, cut in cuts.items():
                got = await _after(restored, name)
                unseen = {e.id for e in old if e.cursor > cut}
                assert {e.id for e in got[:-1]} == unseen and len(got) == len(unseen) + 1, name  # each once
                assert got[-1].position == new.positions[0], name  # and then what is new
                for stream in {e.stream for e in got}:  # each stream in version order
                    versions = [e.version for e in got if e.stream == stream]
                    assert versions == sorted(versions), (name, stream)
            async with restored.connection() as c:  # the next start finds nothing to rebase
                before = await c.fetch("SELECT position, tx_id FROM events ORDER BY position")
                await migrate(c)
                assert await c.fetch("SELECT position, tx_id FROM events ORDER BY position") == before
        finally:
            await restored.close()
    finally:
        target.stop("immediate")


async def test_more_cursors_than_the_new_cluster_used_ids(
    eventlog: EventLog, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each place a checkpoint stands at needs its own id below every id the cluster will assign; a cluster just
    restored has used a few hundred, so the rebase uses up more first, in transactions of a bounded size."""
    monkeypatch.setattr(restored_module, "BURN_CHUNK", 100)
    async with eventlog.connection() as c:
        await _burn_transaction_ids(c, 3000)
    for i in range(1200):  # one transaction each: 1,200 places in commit order
        await eventlog.append(f"agent-{i % 7}", [NewEvent.of(AgentStarted())])
    old = sorted(await eventlog.read_all(limit=2000), key=lambda e: e.cursor)
    await eventlog.save_checkpoints({f"s{i}": e.cursor for i, e in enumerate(old)})
    target = await _dumped_and_restored(db_url, tmp_path)
    try:
        assert await _xmax(target.url) < 1200
        restored = await EventLog.connect(target.url)
        try:
            new = await restored.append("agent-new", [NewEvent.of(AgentStarted())])
            for i in (0, 599, 1198, 1199):
                got = await _after(restored, f"s{i}")
                assert [e.id for e in got[:-1]] == [e.id for e in old[i + 1 :]], i  # in the old commit order
                assert got[-1].position == new.positions[0], i
        finally:
            await restored.close()
    finally:
        target.stop("immediate")

"""A log dumped with pg_dump and restored into another Postgres cluster keeps delivering, from every checkpoint."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncpg

from events import NewEvent
from events.hub import AgentStarted
from storage.embedded import EmbeddedPostgres, find_bin_dir
from storage.eventlog import START, Cursor, EventLog
from storage.restored import rebase_restored
from tests.conftest import free_port


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


async def _dumped_and_restored(db_url: str, tmp_path: Path) -> EmbeddedPostgres:
    """``pg_dump`` of the database at ``db_url`` restored with ``psql`` into a new cluster, running."""
    dump = tmp_path / "log.sql"
    bin_dir = find_bin_dir()
    pg_dump = [str(bin_dir / "pg_dump"), "--no-owner", "--no-privileges", "-f", str(dump), db_url]
    await asyncio.to_thread(subprocess.run, pg_dump, check=True)
    target = EmbeddedPostgres(tmp_path / "restored", free_port())
    await asyncio.to_thread(target.start)
    psql = [str(bin_dir / "psql"), "-q", "-v", "ON_ERROR_STOP=1", "-f", str(dump), target.url]
    await asyncio.to_thread(subprocess.run, psql, check=True, capture_output=True)
    return target


async def test_a_restored_log_resumes_every_checkpoint_exactly(eventlog: EventLog, db_url: str, tmp_path: Path) -> None:
    """The dump keeps each event's transaction id, the old cluster's; the new cluster counts from far below. As
    restored, no subscriber got anything again, and no new event either. At start the restored ids are rebased."""
    async with eventlog.connection() as c:
        await _burn_transaction_ids(c, 3000)  # the old cluster had run longer than the new one will have
    # a commit order unlike the position order: a transaction takes its id, later ones append and commit, then it
    # appends (a higher position, a lower transaction id)
    await eventlog.append("agent-a", [NewEvent.of(AgentStarted())])
    slow = await asyncpg.connect(db_url)
    async with slow.transaction():
        await slow.fetchval("SELECT pg_current_xact_id()")
        for _ in range(3):
            await eventlog.append("agent-a", [NewEvent.of(AgentStarted())])
        await _append_in(slow, "agent-slow")
    await slow.close()
    await eventlog.append("agent-b", [NewEvent.of(AgentStarted()) for _ in range(2)])
    old = sorted(await eventlog.read_all(), key=lambda e: e.cursor)  # commit order
    assert [e.position for e in old] != sorted(e.position for e in old)
    cuts: dict[str, Cursor] = {f"after-{i}": old[i - 1].cursor for i in range(1, len(old) + 1)}
    cuts |= {"none-yet": START, "twin-of-after-3": old[2].cursor}  # two subscribers at one place
    await eventlog.save_checkpoints(cuts)

    target = await _dumped_and_restored(db_url, tmp_path)
    try:
        restored = await EventLog.connect(target.url, run_migrations=False)  # as restored, before any start
        try:
            for name in cuts:
                read = await restored.read_committed(await restored.load_checkpoint(name))
                assert read.events == [] and read.held_back, name  # every restored event looks uncommitted
            new = await restored.append("agent-new", [NewEvent.of(AgentStarted())])
            last = await restored.read_committed(await restored.load_checkpoint(f"after-{len(old)}"))
            assert last.events == []  # the new event sorts below every restored checkpoint
        finally:
            await restored.close()

        restored = await EventLog.connect(target.url)  # a start: migrations, then the rebase
        try:
            for name, cut in cuts.items():
                got = (await restored.read_committed(await restored.load_checkpoint(name))).events
                unseen = {e.id for e in old if e.cursor > cut}
                assert {e.id for e in got[:-1]} == unseen and len(got) == len(unseen) + 1, name  # each once
                assert got[-1].position == new.positions[0], name  # and then what is new
                for stream in {e.stream for e in got}:  # each stream in version order
                    versions = [e.version for e in got if e.stream == stream]
                    assert versions == sorted(versions), (name, stream)
            async with restored.connection() as c:  # nothing left to rebase: the next start changes nothing
                assert await rebase_restored(c) == (0, 0)
        finally:
            await restored.close()
    finally:
        target.stop("immediate")


async def test_more_checkpoints_than_the_new_cluster_used_ids(eventlog: EventLog, db_url: str, tmp_path: Path) -> None:
    """Each place a checkpoint stands at needs its own id below every id the cluster will assign; a cluster just
    restored has used a few hundred, so the rebase uses up more first."""
    async with eventlog.connection() as c:
        await _burn_transaction_ids(c, 3000)
    for i in range(1200):  # one transaction each: 1,200 places in commit order
        await eventlog.append(f"agent-{i % 7}", [NewEvent.of(AgentStarted())])
    old = sorted(await eventlog.read_all(limit=2000), key=lambda e: e.cursor)
    await eventlog.save_checkpoints({f"s{i}": e.cursor for i, e in enumerate(old)})
    target = await _dumped_and_restored(db_url, tmp_path)
    try:
        c = await asyncpg.connect(target.url)
        try:
            assert await c.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint") < 1200
        finally:
            await c.close()
        restored = await EventLog.connect(target.url)
        try:
            new = await restored.append("agent-new", [NewEvent.of(AgentStarted())])
            for i in (0, 599, 1198, 1199):
                got = (await restored.read_committed(await restored.load_checkpoint(f"s{i}"), limit=2000)).events
                assert [e.id for e in got[:-1]] == [e.id for e in old[i + 1 :]], i  # in the old commit order
                assert got[-1].position == new.positions[0], i
        finally:
            await restored.close()
    finally:
        target.stop("immediate")

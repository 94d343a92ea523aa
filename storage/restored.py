"""A log restored into another Postgres cluster (``pg_dump`` / ``pg_restore``) gets transaction ids it can use.

Subscribers read in ``(tx_id, position)`` order and only rows whose ``tx_id`` is below the oldest running
transaction (``storage/eventlog.py``). A dump keeps each row's ``tx_id``, the old cluster's transaction ids, but
the cluster it is restored into counts its own from where it stands, usually far below. Events the old cluster
wrote past that point look written by a transaction still running, so no subscriber is ever given one, and every
new event sorts below the restored checkpoints, so none is given those either: the system delivers nothing, in
silence. Where the old ids straddle the new cluster's counter, the events below it are delivered and the rest
are not.

``rebase_restored`` (run at start, after the migrations) gives every event new, small transaction ids that keep
what each stored cursor has and has not seen: the events are cut at each cursor, in their old commit order, and
segment ``i`` gets ``tx_id = i`` (positions order it inside: only the boundaries between what a subscriber had and
had not seen must keep their order). Each cursor becomes ``(i, the highest position at or below its cut)``: a
subscriber resumes exactly where it stopped, nothing skipped, nothing delivered twice. New transactions get
larger ids than every segment, so new events come after. The cursors stored in the database are the checkpoints
and any snapshot whose state holds a ``cursor`` (``[tx_id, position]``: the orchestrator's timers). One a client
holds (an SSE ``Last-Event-ID`` with a transaction id) means nothing after a restore, as the position alone does."""

from __future__ import annotations

import asyncpg
import structlog

log = structlog.get_logger(__name__)

_XMAX = "pg_snapshot_xmax(pg_current_snapshot())"  # the first transaction id not yet assigned
BURN_CHUNK = 1000
_STORED_CURSORS = """
    SELECT tx_id AS tx, position AS pos FROM checkpoints
    UNION
    SELECT (state->'cursor'->>0)::xid8, (state->'cursor'->>1)::bigint FROM snapshots
    WHERE jsonb_typeof(state->'cursor') = 'array'
"""
_COUNT_CUTS = f"SELECT count(*) FROM ({_STORED_CURSORS}) c"
# Every stored cursor, once each, numbered in commit order: segment ``seg`` ends at it.
_CUTS = f"""
CREATE TEMPORARY TABLE agenthub_cuts ON COMMIT DROP AS
SELECT row_number() OVER (ORDER BY tx, pos) AS seg, tx, pos FROM ({_STORED_CURSORS}) c;
CREATE UNIQUE INDEX ON agenthub_cuts (tx, pos);
"""
# Each event into the segment after the last cursor below it (read from the rows as they were: an UPDATE's
# subquery sees the old values).
_SEGMENT = """
WITH moved AS (
    UPDATE events e SET tx_id = (1 + coalesce((
        SELECT c.seg FROM agenthub_cuts c WHERE (c.tx, c.pos) < (e.tx_id, e.position)
        ORDER BY c.tx DESC, c.pos DESC LIMIT 1), 0))::text::xid8
    RETURNING 1
) SELECT count(*) FROM moved
"""
# Each cursor to (its segment, the highest position of its segment or any before it).
_RUNNING_TOP = """
CREATE TEMPORARY TABLE agenthub_moved ON COMMIT DROP AS
SELECT c.seg, c.tx, c.pos, coalesce(max(top.high) OVER (ORDER BY c.seg), 0) AS high
FROM agenthub_cuts c LEFT JOIN (
    SELECT tx_id::text::bigint AS seg, max(position) AS high FROM events GROUP BY tx_id
) top ON top.seg = c.seg
"""
_CHECKPOINTS = """
UPDATE checkpoints ch SET tx_id = m.seg::text::xid8, position = m.high
FROM agenthub_moved m WHERE (ch.tx_id, ch.position) = (m.tx, m.pos)
"""
_SNAPSHOTS = """
UPDATE snapshots s SET state = jsonb_set(s.state, '{cursor}', jsonb_build_array(m.seg, m.high))
FROM agenthub_moved m
WHERE jsonb_typeof(s.state->'cursor') = 'array'
  AND ((s.state->'cursor'->>0)::xid8, (s.state->'cursor'->>1)::bigint) = (m.tx, m.pos)
"""


async def rebase_restored(conn: asyncpg.Connection) -> int:
    """Rebase a restored log (see the module); returns how many events were rebased, 0 (one index probe) when the
    log's newest transaction id is one this cluster has reached. Writers wait meanwhile."""
    detect = f"SELECT (SELECT tx_id FROM events ORDER BY tx_id DESC LIMIT 1) >= {_XMAX}"
    if not await conn.fetchval(detect):
        return 0
    # Ids used up first, in transactions of their own: a subtransaction's id stays locked until its top-level
    # transaction ends, and thousands at once (a runner's checkpoint per agent) would fill the lock table.
    await _make_room(conn, await conn.fetchval(_COUNT_CUTS) + 1)
    async with conn.transaction():
        if not await conn.fetchval(detect):  # another start did it meanwhile
            return 0
        # readers go on; writers wait (``streams`` too: an append writes it first, and would take its id there)
        await conn.execute("LOCK TABLE streams, events, checkpoints, snapshots IN EXCLUSIVE MODE")
        log.warning("rebasing a restored log: its transaction ids come from another cluster (one pass over the log)")
        await conn.execute(_CUTS)
        segments = await conn.fetchval("SELECT count(*) + 1 FROM agenthub_cuts")
        await _make_room(conn, segments)  # a cursor saved since the count: a few, in this transaction
        rebased: int = await conn.fetchval(_SEGMENT)
        await conn.execute(_RUNNING_TOP)
        await conn.execute(_CHECKPOINTS)
        await conn.execute(_SNAPSHOTS)
    log.warning("restored log rebased", events=rebased, cursors=segments - 1)
    return rebased


async def _make_room(conn: asyncpg.Connection, highest: int) -> None:
    """Make sure the ids ``1..highest`` are below every transaction id this cluster will assign: a cluster just
    restored has used only a few hundred, and a log may have more cursors than that. Each subtransaction that
    writes uses one id (a temporary table's row is enough), ``BURN_CHUNK`` to a transaction (a savepoint when the
    caller holds one)."""
    while (short := highest + 1 - await conn.fetchval(f"SELECT {_XMAX}::text::bigint")) > 0:
        async with conn.transaction():
            await conn.execute(
                "CREATE TEMPORARY TABLE IF NOT EXISTS agenthub_xid_burn (n int); "
                f"DO $$ BEGIN FOR i IN 1..{min(short, BURN_CHUNK)} LOOP BEGIN INSERT INTO agenthub_xid_burn "
                "VALUES (i); EXCEPTION WHEN OTHERS THEN RAISE; END; END LOOP; END $$; TRUNCATE agenthub_xid_burn"
            )

"""A log restored into another Postgres cluster (``pg_dump`` / ``pg_restore``) gets transaction ids it can use.

Subscribers read in ``(tx_id, position)`` order and only rows whose ``tx_id`` is below the oldest running
transaction (``storage/eventlog.py``). A dump keeps each row's ``tx_id``, the old cluster's transaction ids, but
the cluster it is restored into counts its own from where it stands, usually far below. Every restored event then
looks written by a transaction still running, so no subscriber is ever given one, and every new event sorts below
every restored checkpoint, so none is given those either: the restored system delivers nothing, silently.

``rebase_restored`` (run at start, with the migrations) gives the restored rows small transaction ids that keep
what every checkpoint has and has not seen: the restored events are cut at each restored checkpoint's cursor, in
their old commit order, and segment ``i`` gets ``tx_id = i + 1``, its events in position order inside it (only
the boundaries between what a subscriber had and had not seen must keep their order). Each checkpoint becomes
``(i + 1, the highest position at or below its cut)``: a subscriber resumes exactly where it stopped, with nothing
skipped and nothing delivered twice. New transactions have larger ids than every segment, so new events come after.
Checkpoints are the only cursors kept in the database; one a client holds (an SSE ``Last-Event-ID`` with a
transaction id) means nothing after a restore, as the position alone does."""

from __future__ import annotations

import asyncpg
import structlog

log = structlog.get_logger(__name__)

_XMAX = "pg_snapshot_xmax(pg_current_snapshot())"  # the first transaction id not yet assigned


async def rebase_restored(conn: asyncpg.Connection) -> tuple[int, int]:
    """Rebase the rows whose ``tx_id`` this cluster has not reached (see the module); returns how many events
    and checkpoint cursors were rebased, ``(0, 0)`` (one index probe) when there are none. Writers wait meanwhile."""
    async with conn.transaction():
        if not await conn.fetchval(f"SELECT (SELECT tx_id FROM events ORDER BY tx_id DESC LIMIT 1) >= {_XMAX}"):
            return 0, 0
        await conn.execute("LOCK TABLE events, checkpoints IN EXCLUSIVE MODE")  # readers go on; writers wait
        xmax: int = await conn.fetchval(f"SELECT {_XMAX}")
        cuts: list[tuple[int, int]] = [
            (r[0], r[1])
            for r in await conn.fetch(
                "SELECT DISTINCT tx_id, position FROM checkpoints WHERE tx_id >= $1 ORDER BY 1, 2", xmax
            )
        ]
        await _make_room(conn, len(cuts) + 1, xmax)
        rebased, highest, lower = 0, 0, (0, 0)
        for segment, cut in enumerate([*cuts, None], start=1):
            upto = "" if cut is None else " AND (tx_id, position) <= ($5, $6)"
            n, top = await conn.fetchrow(
                "WITH moved AS (UPDATE events SET tx_id = $1 WHERE tx_id >= $2 AND (tx_id, position) > ($3, $4)"
                f"{upto} RETURNING position) SELECT count(*), max(position) FROM moved",
                segment,
                xmax,
                *lower,
                *(cut or ()),
            )
            rebased += n
            highest = max(highest, top or 0)
            if cut is not None:
                await conn.execute(
                    "UPDATE checkpoints SET tx_id = $1, position = $2 WHERE (tx_id, position) = ($3, $4)",
                    segment,
                    highest,
                    *cut,
                )
                lower = cut
    log.warning(
        "restored log rebased: its transaction ids came from another cluster", events=rebased, checkpoints=len(cuts)
    )
    return rebased, len(cuts)


async def _make_room(conn: asyncpg.Connection, highest: int, xmax: int) -> None:
    """Make sure the ids ``1..highest`` are below every transaction id this cluster will assign: a cluster just
    restored has used only a few hundred, and a log may have more checkpoints than that. Each subtransaction
    that writes uses one id (a temporary table's row is enough)."""
    short = highest + 1 - xmax
    if short <= 0:
        return
    await conn.execute("CREATE TEMPORARY TABLE agenthub_xid_burn (n int) ON COMMIT DROP")
    await conn.execute(
        f"DO $$ BEGIN FOR i IN 1..{short} LOOP "
        "BEGIN INSERT INTO agenthub_xid_burn VALUES (i); EXCEPTION WHEN OTHERS THEN RAISE; END; END LOOP; END $$"
    )

"""Batched read-model writes: grouped by table, merged runs, and the same result as running them one by one."""

from __future__ import annotations

import pytest

from actors.statements import Statements
from storage.eventlog import EventLog

INSERT_A = "INSERT INTO a VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = a.v || EXCLUDED.v"
UPDATE_A = "UPDATE a SET v = v || '!' WHERE k = $1"
INSERT_B = "INSERT INTO b VALUES ($1)"


async def test_a_batch_ends_as_the_statements_run_in_order_would(eventlog: EventLog) -> None:
    writes: list[tuple[str, tuple[object, ...]]] = [
        (INSERT_A, (1, "x")),
        (INSERT_B, (10,)),
        (INSERT_A, (1, "y")),  # merged with the first: tables b and a commute
        (UPDATE_A, (1,)),  # a different statement on table a: must run after both inserts
        (INSERT_B, (11,)),
        (INSERT_A, (1, "z")),  # after the update, not merged into the first run
    ]
    async with eventlog.connection() as conn:
        await conn.execute("CREATE TEMP TABLE a (k int PRIMARY KEY, v text); CREATE TEMP TABLE b (n int)")
        batch = Statements()
        for sql, args in writes:
            await batch.execute(sql, *args)
        async with conn.transaction():
            trips = await batch.run(conn)
        batched = (await conn.fetchval("SELECT v FROM a WHERE k = 1"), await conn.fetch("SELECT n FROM b"))

        await conn.execute("TRUNCATE a, b")
        for sql, args in writes:
            await conn.execute(sql, *args)
        one_by_one = (await conn.fetchval("SELECT v FROM a WHERE k = 1"), await conn.fetch("SELECT n FROM b"))
    assert batched == one_by_one and batched[0] == "xy!z"
    assert [r["n"] for r in batched[1]] == [10, 11]
    assert trips == 4  # a: two inserts, the update, an insert; b: two inserts


async def test_a_statement_must_name_its_table() -> None:
    with pytest.raises(ValueError, match="one table"):
        await Statements().execute("SELECT 1")

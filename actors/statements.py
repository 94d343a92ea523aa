"""A batch of read-model writes, run with one ``executemany`` per run of the same statement.

Projections write one row-level statement per event. Sent one by one, each is a round trip; grouped, a batch of
deliveries costs a few. Every statement writes exactly one table, so statements of different tables commute and
are grouped by table; within a table the order is kept, and only consecutive uses of the same statement are
merged (asyncpg pipelines an ``executemany``, and its rows still run in order)."""

from __future__ import annotations

import re
from typing import Any

import asyncpg

_TABLE = re.compile(r"^\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(\w+)", re.IGNORECASE)


class Statements:
    """Has the ``execute`` of an asyncpg connection, so projection code is the same whether it runs at once or
    is collected here."""

    def __init__(self) -> None:
        self.tables: dict[str, list[tuple[str, list[tuple[Any, ...]]]]] = {}

    async def execute(self, sql: str, *args: Any) -> None:
        m = _TABLE.match(sql)
        if m is None:
            raise ValueError(f"a batched statement must write one table: {sql[:60]!r}")
        runs = self.tables.setdefault(m.group(1), [])
        if runs and runs[-1][0] == sql:
            runs[-1][1].append(args)
        else:
            runs.append((sql, [args]))

    async def run(self, conn: asyncpg.Connection) -> int:
        """Run everything on ``conn`` (inside the caller's transaction); returns the round trips made."""
        trips = 0
        for runs in self.tables.values():
            for sql, rows in runs:
                await conn.executemany(sql, rows)
                trips += 1
        return trips

"""Versioned SQL migrations (``storage/migrations/NNNN_name.sql``), applied at start under a lock."""

from __future__ import annotations

from importlib import resources

import asyncpg
import structlog

from storage.restored import rebase_restored

log = structlog.get_logger(__name__)

_LOCK_KEY = 0x4147_4855_4221  # 'AGHUB!': one migrator at a time across processes


def migration_files() -> list[tuple[int, str, str]]:
    files = resources.files("storage") / "migrations"
    out = []
    for f in sorted(files.iterdir(), key=lambda p: p.name):
        if f.name.endswith(".sql"):
            out.append((int(f.name.split("_", 1)[0]), f.name, f.read_text()))
    return out


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every migration not yet recorded in ``schema_migrations``, then rebase a log restored from another
    cluster (``storage/restored.py``), under the same lock; returns the names applied."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            log.info("migration applied", migration=name)
            applied.append(name)
        await rebase_restored(conn)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied

"""The embedded Postgres under any data directory a user may have."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from storage.embedded import EmbeddedPostgres
from tests.conftest import free_port


async def test_it_starts_under_a_path_with_a_space_and_too_long_for_a_unix_socket(tmp_path: Path) -> None:
    """``/home/Jane Doe/...`` split the server's options in two, and a socket path over 107 bytes was fatal; the
    server listens on TCP only (the URL's 127.0.0.1)."""
    root = tmp_path / "Jane Doe" / ("deep" * 20)
    assert len(str(root / "pgdata" / ".s.PGSQL.65535")) > 107
    pg = EmbeddedPostgres(root, free_port())
    url = pg.start()
    try:
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        assert pg.running()
    finally:
        pg.stop()
    assert not pg.running()

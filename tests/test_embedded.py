"""The embedded Postgres under any data directory a user may have."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import asyncpg
import pytest

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


async def test_the_superuser_needs_the_password_the_url_carries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any local user can reach 127.0.0.1: with trust auth, any of them was the superuser (``COPY ... TO PROGRAM``,
    the stored secrets). The password is random, in a file only the server's user can read."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    pg = EmbeddedPostgres(tmp_path / "data", free_port())
    url = pg.start()
    try:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", database="postgres")
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", password="guess")
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        st = pg.password_file.stat()
        assert st.st_mode & 0o777 == 0o600
        assert st.st_uid == (pwd.getpwnam(pg.user).pw_uid if pg.user else os.geteuid())
    finally:
        pg.stop()


async def test_an_interrupted_initdb_is_moved_aside_and_run_again(tmp_path: Path) -> None:
    """initdb writes PG_VERSION first: killed after it (Ctrl-C, OOM), it left a directory every start took for a
    cluster and failed on, for good."""
    pg = EmbeddedPostgres(tmp_path / "data", free_port())
    pg.pgdata.mkdir(parents=True)
    (pg.pgdata / "PG_VERSION").write_text("15\n")
    url = pg.start()
    try:
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        [aside] = pg.root.glob("pgdata.incomplete-*")  # kept, not deleted: it is not ours to destroy
        assert (aside / "PG_VERSION").read_text() == "15\n"
    finally:
        pg.stop()


async def test_a_cluster_an_older_version_made_keeps_its_data_without_a_password(tmp_path: Path) -> None:
    """Made with trust auth and no password file, started before (it has no initdb marker): still a whole cluster,
    reached by a URL without a password."""
    pg = EmbeddedPostgres(tmp_path / "data", free_port())
    pg._prepare_dirs()
    pg._run("initdb", "-D", str(pg.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    opts = f"-p {pg.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
    pg._run("pg_ctl", "start", "-w", "-D", str(pg.pgdata), "-l", str(pg.pgdata / "server.log"), "-o", opts)
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres")
    await conn.execute("CREATE TABLE kept (x int)")
    await conn.close()
    pg.stop()
    url = pg.start()
    try:
        assert url == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT count(*) FROM kept") == 0
        await conn.close()
    finally:
        pg.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_as_root_only_the_service_user_may_go_through_the_data_dirs_parents(tmp_path: Path) -> None:
    """Postgres, run as its own user, must reach its directory; adding o+x to every parent up to / let every
    local user into /root, say, and read its world-readable files."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "secret.env").write_text("KEY=1\n")
    (private / "secret.env").chmod(0o644)
    pg = EmbeddedPostgres(private / "data", free_port())
    pg.start()
    try:
        assert pg.running()
        for p in (private, tmp_path):
            assert p.stat().st_mode & 0o007 == 0
        as_nobody = ["runuser", "-u", "nobody", "--", "cat", str(private / "secret.env")]
        assert subprocess.run(as_nobody, capture_output=True).returncode != 0
    finally:
        pg.stop()


def test_a_stop_does_not_rest_on_a_status_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``pg_ctl status`` that failed for its own reasons read as "not running", and the stop was skipped in
    silence: the test of a database outage once found the database answering after it was "stopped"."""
    pg = EmbeddedPostgres(tmp_path / "pg", free_port())
    pg.start()
    try:
        with monkeypatch.context() as m:
            m.setattr(pg, "running", lambda: False)  # the status check failed
            pg.stop()
        assert not pg.running()
        pg.stop()  # stopped already: nothing to do
    finally:
        pg.stop("immediate")

"""Shared fixtures: one real embedded Postgres per test session, a fresh database per test."""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from storage.embedded import EmbeddedPostgres
from storage.eventlog import EventLog
from storage.migrate import migrate

_counter = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def embedded_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(Path(tmp_path_factory.mktemp("pg")), free_port())
    pg.start()
    yield pg
    pg.stop("immediate")


@pytest.fixture(scope="session")
async def template_db(embedded_pg: EmbeddedPostgres) -> str:
    conn = await asyncpg.connect(embedded_pg.url)
    await conn.execute("CREATE DATABASE agenthub_template")
    await conn.close()
    t = await asyncpg.connect(embedded_pg.url.rsplit("/", 1)[0] + "/agenthub_template")
    await migrate(t)
    await t.close()
    return "agenthub_template"


@pytest.fixture
async def db_url(embedded_pg: EmbeddedPostgres, template_db: str) -> str:
    """A fresh, migrated database for one test."""
    name = f"t{next(_counter)}"
    conn = await asyncpg.connect(embedded_pg.url)
    await conn.execute(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    await conn.close()
    return embedded_pg.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
async def eventlog(db_url: str) -> AsyncIterator[EventLog]:
    log = await EventLog.connect(db_url, max_size=20, max_event_bytes=4096)
    yield log
    await log.close()

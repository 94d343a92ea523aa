"""Shared fixtures: one real embedded Postgres per test session, a fresh database per test."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from cluster.bootstrap import System, down, up
from cluster.ports import free_port
from cluster.settings import Settings
from storage.embedded import EmbeddedPostgres
from storage.eventlog import EventLog
from storage.migrate import migrate

_counter = itertools.count()


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


# ---- the whole system: Ray, the orchestrator and Ray Serve over real HTTP, on its own embedded Postgres ----


@pytest.fixture(scope="session")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    settings = Settings(
        data_dir=Path(tmp_path_factory.mktemp("hub")),
        pg_port=free_port(),
        http_port=free_port(),
        dashboard_port=free_port(),
        api_token="test-token",
        heartbeat_interval_s=1.0,
        reply_timeout_s=15.0,
        max_event_bytes=16 * 1024,
        max_restart_attempts=20,
        held_back_warn_s=2.0,  # test_faults holds a transaction open: reported in seconds, not the default 10
    )
    sys_ = up(settings)
    yield sys_
    down(sys_)


@pytest.fixture
async def http(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.api_url, headers={"Authorization": "Bearer test-token"}, timeout=60
    ) as client:
        yield client


@pytest.fixture
async def hub_log(system: System) -> AsyncIterator[EventLog]:
    log = await EventLog.connect(system.database_url, run_migrations=False)
    yield log
    await log.close()


async def new_agent(http: httpx.AsyncClient, start: bool = True, **settings: object) -> str:
    r = await http.post("/api/v1/agents", json={"name": "test agent", "settings": settings})
    assert r.status_code == 201, r.text
    agent_id = r.json()["id"]
    if start:
        assert (await http.post(f"/api/v1/agents/{agent_id}/start")).json()["status"] == "running"
    return agent_id


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def count_calls(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> list[None]:
    """Wrap the coroutine method ``obj.name`` to note each call; the list's length is the count so far."""
    calls: list[None] = []
    method = getattr(obj, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        return await method(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls

"""The ``agenthub`` CLI against the running test system's Postgres: export, replay and tail.

Synchronous tests: the CLI runs its own event loop, as it does from a shell."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import psutil
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from actors.tools.test_runner import as_child
from cluster.bootstrap import System
from cluster.cli import app
from cluster.settings import Settings, get_settings
from events import NewEvent
from events.hub import AgentStarted
from events.team import RunCompleted, RunStarted
from storage.embedded import EmbeddedPostgres
from storage.eventlog import EventLog
from tests.conftest import free_port

runner = CliRunner()


@pytest.fixture
def cli_env(system: System, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DATABASE_URL", system.database_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def client(system: System) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.api_url, headers={"Authorization": "Bearer test-token"}, timeout=60) as c:
        yield c


def sql(system: System, query: str, *args: object) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(system.database_url)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def agent_with_messages(client: httpx.Client, chat: str, texts: list[str]) -> str:
    agent_id = client.post("/api/v1/agents", json={"name": "cli"}).json()["id"]
    client.post(f"/api/v1/agents/{agent_id}/start").raise_for_status()
    for text in texts:
        assert (
            client.post(f"/api/v1/agents/{agent_id}/messages", json={"text": text, "chat_id": chat}).status_code == 200
        )
    return agent_id


def test_export_writes_the_log_to_parquet(cli_env: None, system: System, client: httpx.Client, tmp_path: Path) -> None:
    agent_with_messages(client, "e", ["exported"])
    # Counted, not taken from the head: an append that did not commit leaves a gap in the positions (the chaos
    # test, earlier on this system, restarts Postgres under load).
    after_3 = sql(system, "SELECT count(*) FROM events WHERE position > 3")
    out = tmp_path / "log.parquet"
    result = runner.invoke(app, ["export", "--out", str(out), "--from-position", "3"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.num_rows >= after_3 and table.column("position")[0].as_py() == 4
    assert set(table.column_names) >= {"position", "stream", "version", "type", "data", "meta", "recorded_at"}
    assert "exported" in " ".join(table.column("data").to_pylist())


def test_replay_rebuilds_an_agent_with_no_provider_calls(cli_env: None, client: httpx.Client) -> None:
    agent_id = agent_with_messages(client, "r", ["one", "two"])
    result = runner.invoke(app, ["replay", f"agent-{agent_id}"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "2 messages, 2 replies verified, 0 mismatches, 2 completions read from the log" in out
    assert "0 messages unanswered" in out
    assert runner.invoke(app, ["replay", "agent-nosuch"]).exit_code == 1


def test_replay_detects_a_tampered_reply(cli_env: None, system: System, client: httpx.Client) -> None:
    agent_id = agent_with_messages(client, "t", ["x"])
    sql(
        system,
        "UPDATE events SET data = jsonb_set(data, '{response}', '\"forged\"') "
        "WHERE stream = $1 AND type = 'chat.reply_sent'",
        f"chat-{agent_id}/t",
    )
    result = runner.invoke(app, ["replay", f"agent-{agent_id}"])
    assert result.exit_code == 1 and "mismatch" in result.output


def test_events_tail_prints_history(cli_env: None, client: httpx.Client) -> None:
    agent_with_messages(client, "tail", ["tailed"])
    result = runner.invoke(app, ["events", "tail", "--from", "0", "--no-follow"])
    assert result.exit_code == 0 and "tailed" in result.output


def test_team_replay_and_fork_from_the_command_line(cli_env: None, system: System, client: httpx.Client) -> None:
    import time

    import ray

    from actors.agents.team.script import TEAM_SCRIPT

    run_id = client.post("/api/v1/runs", json={"goal": "cli", "provider": "scripted:team"}).json()["run_id"]
    ray.get(ray.get_actor("llm", namespace=system.settings.ray_namespace).set_script.remote("team", TEAM_SCRIPT))
    task_id = client.post(f"/api/v1/runs/{run_id}/tasks", json={"title": "Prices", "role": "cfo"}).json()["task_id"]
    deadline = time.monotonic() + 60
    while client.get(f"/api/v1/tasks/{task_id}").json()["status"] != "completed":
        assert time.monotonic() < deadline, "task did not complete"
        time.sleep(0.3)
    listed = client.get("/api/v1/tasks", params={"run_id": run_id, "fresh": "true"})  # replay compares with them
    assert listed.json()[0]["status"] == "completed"
    result = runner.invoke(app, ["replay", f"run-{run_id}"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "1 tasks {'completed': 1}" in out and "0 mismatches (a fold of the log" in out
    first_attempt = next(
        e for e in client.get(f"/api/v1/tasks/{task_id}/timeline").json() if e["type"] == "task.attempted"
    )
    result = runner.invoke(app, ["fork", "--at", str(first_attempt["position"]), "--model", "scripted-v3"])
    assert result.exit_code == 0, result.output
    new_run = result.output.split("forked into run ")[1].split(";")[0]
    assert new_run.startswith(f"{run_id}_f")
    forked = client.get(f"/api/v1/streams/run-{new_run}").json()["events"]
    assert [e["type"] for e in forked][:2] == ["run.started", "run.forked"]
    assert forked[1]["data"]["model"] == "scripted-v3" and forked[1]["data"]["from_run"] == run_id


# ---- without Ray: the CLI on a fresh database of its own ------------------------------------------------


@pytest.fixture
def cli_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield db_url
    get_settings.cache_clear()


def append_with_a_gap(db_url: str) -> tuple[list[int], int]:
    """Two events, a position used up by nothing (as a rolled-back append leaves), two more: positions, gap."""

    async def run() -> tuple[list[int], int]:
        store = await EventLog.connect(db_url, run_migrations=False)
        try:
            before = [(await store.append("agent-gap", [NewEvent.of(AgentStarted())])).positions[0] for _ in "ab"]
            gap = int(await store.fetchval("SELECT nextval(pg_get_serial_sequence('events', 'position'))"))
            after = [(await store.append("agent-gap", [NewEvent.of(AgentStarted())])).positions[0] for _ in "cd"]
            return before + after, gap
        finally:
            await store.close()

    return asyncio.run(run())


def test_export_progress_counts_events_not_positions(cli_db: str, tmp_path: Path) -> None:
    positions, _ = append_with_a_gap(cli_db)
    out = tmp_path / "gap.parquet"
    result = runner.invoke(app, ["export", "--out", str(out), "--from-position", str(positions[0])])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).column("position").to_pylist() == positions[1:]
    assert "3/3" in result.output and "wrote 3 events" in result.output  # positions to the head: 4


def test_events_tail_follows_from_a_position_with_no_event(cli_db: str) -> None:
    positions, gap = append_with_a_gap(cli_db)
    tail = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "events", "tail", "--from", str(gap)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "DATABASE_URL": cli_db},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in tail.stdout], daemon=True).start()
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while sum('"position":' in line for line in seen) < 2:
            try:
                seen.append(lines.get(timeout=0.2))
            except queue.Empty:
                assert tail.poll() is None and time.monotonic() < deadline, "".join(seen)
        printed = [int(line.split(":")[1].strip(" ,\n")) for line in seen if '"position":' in line]
        assert printed == positions[2:]
    finally:
        tail.kill()
        tail.wait()


def test_fork_at_a_gap_is_an_error_not_the_next_events_run(cli_db: str) -> None:
    """Run B's start, run A's start, a gap, run B's end: the event after the gap is run B's, not one at --at."""

    async def append() -> tuple[int, int]:
        store = await EventLog.connect(cli_db, run_migrations=False)
        try:
            await store.append("run-B", [NewEvent.of(RunStarted(run_id="B", goal="b"))])
            a = (await store.append("run-A", [NewEvent.of(RunStarted(run_id="A", goal="a"))])).positions[0]
            gap = int(await store.fetchval("SELECT nextval(pg_get_serial_sequence('events', 'position'))"))
            await store.append("run-B", [NewEvent.of(RunCompleted(run_id="B", summary="done"))])
            return a, gap
        finally:
            await store.close()

    a, gap = asyncio.run(append())
    result = runner.invoke(app, ["fork", "--at", str(gap)])
    assert result.exit_code == 2, result.output
    assert f"no run event at position {gap}" in " ".join(result.output.split())
    assert runner.invoke(app, ["fork", "--at", "0"]).exit_code == 2
    result = runner.invoke(app, ["fork", "--at", str(a)])
    assert result.exit_code == 0 and "forked into run A_f" in result.output, result.output
    assert asyncio.run(forked_runs(cli_db)) == ["run-A"]  # run B was never forked


async def forked_runs(db_url: str) -> list[str]:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT DISTINCT stream FROM events WHERE stream LIKE 'run-%\\_f%'")
        return [r["stream"].split("_f")[0] for r in rows]
    finally:
        await conn.close()


def test_a_command_stops_the_embedded_postgres_it_started(tmp_path: Path) -> None:
    """``pg_ctl`` detaches the server: `agenthub export` on a stopped system left one running after it exited."""
    pg, env = _stopped_database(tmp_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "cluster.cli", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    try:
        done = cli("export", "--out", str(tmp_path / "log.parquet"))
        assert done.returncode == 0 and "wrote 0 events" in done.stdout, done.stdout + done.stderr
        assert not pg.running()

        pg.start()  # one that was running already (a system is up) is left running
        done = cli("replay", "agent-nosuch")
        assert done.returncode == 1 and "has no events" in done.stdout, done.stdout + done.stderr
        assert pg.running()
        pg.stop()

        # one this started, but that another process connected to meanwhile (an `up` while this tails): left running
        tail = _tail_starting_the_database(env, pg)

        async def connected_while_tailing() -> None:
            other = await _once_tailing(pg)
            try:
                tail.send_signal(signal.SIGINT)
                out = await asyncio.to_thread(tail.communicate, timeout=60)
                assert "left running: 1 other connection" in " ".join(out[0].split()), out[0]  # rich wraps lines
                assert pg.running()
            finally:
                await other.close()

        asyncio.run(connected_while_tailing())
    finally:
        pg.stop("immediate")


def test_sigterm_ends_a_command_as_ctrl_c_does(tmp_path: Path) -> None:
    """SIGTERM (a service manager's stop, `kill`) killed the command outright, past its exit handlers: the embedded
    Postgres it had started ran on."""
    pg, env = _stopped_database(tmp_path)
    tail = _tail_starting_the_database(env, pg)
    try:

        async def terminated_while_tailing() -> None:
            other = await _once_tailing(pg)
            pid = await other.fetchval("SELECT pg_backend_pid()")
            await other.close()
            with contextlib.suppress(psutil.NoSuchProcess):  # its backend gone: the tail's are the only ones
                await asyncio.to_thread(psutil.Process(pid).wait, 30)
            tail.send_signal(signal.SIGTERM)
            out = await asyncio.to_thread(tail.communicate, timeout=60)
            assert tail.returncode == 128 + signal.SIGTERM and "Traceback" not in out[0], out[0]

        asyncio.run(terminated_while_tailing())
        assert not pg.running()
    finally:
        tail.kill()
        pg.stop("immediate")


def _stopped_database(tmp_path: Path) -> tuple[EmbeddedPostgres, dict[str, str]]:
    """A data dir as `agenthub down` leaves it, and the environment of a CLI that uses it."""
    pg = EmbeddedPostgres(tmp_path / "data" / "postgres", free_port())
    pg.start()
    pg.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTHUB_") and k != "DATABASE_URL"}
    return pg, env | {"AGENTHUB_DATA_DIR": str(tmp_path / "data"), "AGENTHUB_PG_PORT": str(pg.port)}


def _tail_starting_the_database(env: dict[str, str], pg: EmbeddedPostgres) -> subprocess.Popen[str]:
    tail = subprocess.Popen(
        as_child([sys.executable, "-m", "cluster.cli", "events", "tail"]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not pg.running():
        assert tail.poll() is None and time.monotonic() < deadline, "tail did not start the database"
        time.sleep(0.1)
    return tail


async def _once_tailing(pg: EmbeddedPostgres) -> asyncpg.Connection:
    """A connection of our own, once the tail's store is open (it follows the log)."""
    deadline = time.monotonic() + 60
    other = None
    while other is None:  # the server's pid file comes before it takes connections
        assert time.monotonic() < deadline, "the database the tail started takes no connection"
        with contextlib.suppress(OSError, asyncpg.CannotConnectNowError):  # refused; still starting up
            other = await asyncpg.connect(pg.url)
        await asyncio.sleep(0.1)
    tailing = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'agenthub-cli-%'"
    while not await other.fetchval(tailing):
        assert time.monotonic() < deadline, "the tail did not connect"
        await asyncio.sleep(0.1)
    return other


def test_bad_command_line_values_are_usage_errors() -> None:
    result = runner.invoke(app, ["fork", "--at", "5", "--prompt", "cfo: be frugal"])
    assert result.exit_code == 2 and "ROLE=TEXT" in result.output and "Traceback" not in result.output
    assert runner.invoke(app, ["events", "tail", "--from", "-1"]).exit_code == 2
    assert runner.invoke(app, ["export", "--out", "x.parquet", "--from-position", "-3"]).exit_code == 2


def test_a_generated_token_is_readable_by_its_owner_only_and_kept(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_token=None)
    token, generated = settings.resolve_api_token()
    assert generated and len(token) >= 32
    assert (tmp_path / "data" / "api_token").stat().st_mode & 0o777 == 0o600
    assert settings.resolve_api_token() == (token, False)  # the next start uses the same one

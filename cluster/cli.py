"""The ``agenthub`` command line."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import asyncpg
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from actors.observability import configure_logging
from cluster.settings import Settings, get_settings

if TYPE_CHECKING:
    from storage.embedded import EmbeddedPostgres
    from storage.eventlog import EventLog

app = typer.Typer(
    help="Event-sourced actor system on Ray: agents, browsers and integrations over one log.",
    no_args_is_help=True,
)
events_app = typer.Typer(help="Read the event log.", no_args_is_help=True)
app.add_typer(events_app, name="events")
team_app = typer.Typer(help="The autonomous role-agent team.", no_args_is_help=True)
app.add_typer(team_app, name="team")
console = Console()
POSITION_MAX = 2**63 - 1  # positions are Postgres bigints


def _settings(address: str | None = None, port: int | None = None, drain_timeout_s: float | None = None) -> Settings:
    s = get_settings()
    given = {"ray_address": address, "http_port": port, "drain_timeout_s": drain_timeout_s}
    updates = {k: v for k, v in given.items() if v is not None}
    return s.model_copy(update=updates) if updates else s


@contextlib.contextmanager
def _cluster_required(address: str | None) -> Iterator[None]:
    """A Ray address nothing answers at, or a local system's HTTP port taken: one clear line and exit status 1,
    not a traceback."""
    from cluster.bootstrap import ClusterUnreachable, HttpPortInUse

    try:
        yield
    except ClusterUnreachable as e:
        console.print(f"[red]no Ray cluster at {address}:[/] {e}")
        raise typer.Exit(1) from None
    except HttpPortInUse as e:
        console.print(f"[red]cannot serve HTTP:[/] {e}")
        raise typer.Exit(1) from None


# The name this process's connections give Postgres, so that at exit it can tell them from anyone else's.
CLIENT_NAME = f"agenthub-cli-{os.getpid()}"


async def _open_store(s: Settings) -> EventLog:
    """The event log, on the embedded Postgres if need be. One this starts is stopped as the process exits
    (``pg_ctl`` detaches it: it would run on), registered by the starting thread itself: after a Ctrl-C during the
    start, ``asyncio.run`` lets that thread finish before the process exits, so that server is stopped too."""
    from cluster.bootstrap import start_database
    from storage.eventlog import EventLog

    def start() -> str:
        url, started = start_database(s)
        if started is not None:
            atexit.register(_stop_unless_in_use, started)
        return url

    _exit_on_sigterm()  # before the start: a SIGTERM during it still stops the server (registered as it returns)
    url = await asyncio.to_thread(start)
    # asyncpg passes a DSN's unknown parameters on as settings: every connection of this process, the LISTEN one too
    named = f"{url}{'&' if '?' in url else '?'}application_name={CLIENT_NAME}"
    return await EventLog.connect(named, run_migrations=False)


def _exit_on_sigterm() -> None:
    """SIGTERM (a service manager's stop, ``kill``) ends the command through its exit handlers, as Ctrl-C does:
    by default it kills the process outright, and a Postgres the command started runs on."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, exit_by_signal)


def exit_by_signal(signum: int, _frame: object) -> None:
    """A signal handler that ends the process as ``sys.exit`` does, so ``finally`` blocks and exit handlers run."""
    raise SystemExit(128 + signum)


def _stop_unless_in_use(pg: EmbeddedPostgres) -> None:
    """Stop the server this command started, unless another process connected to it meanwhile (an `agenthub up`
    started while this one tailed the log finds it running and uses it: stopped under it, nothing is routed)."""

    async def others() -> int:
        conn = await asyncpg.connect(pg.url, timeout=10)
        try:
            n: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid() AND application_name <> $1",
                CLIENT_NAME,
            )
            return n
        finally:
            await conn.close()

    try:
        in_use = asyncio.run(others())
    except Exception as e:  # cannot tell: leave it running rather than stop it under someone
        console.print(f"the embedded Postgres this command started is left running: no way to tell who uses it ({e})")
        return
    if in_use:
        console.print(f"the embedded Postgres this command started is left running: {in_use} other connection(s)")
        return
    pg.stop()


@app.command()
def up(
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default AGENTHUB_RAY_ADDRESS, else start a local Ray)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default 8000)")] = None,
) -> None:
    """Start Postgres (embedded unless DATABASE_URL), Ray, the orchestrator and the HTTP API. On a local Ray: run
    until Ctrl-C. On a cluster (--address or AGENTHUB_RAY_ADDRESS): deploy and return; it runs there until
    `agenthub down`."""
    from cluster.bootstrap import down
    from cluster.bootstrap import up as bring_up

    configure_logging()
    settings = _settings(address, port)
    with _cluster_required(settings.ray_address):
        system = bring_up(settings)
    try:
        console.print(f"[bold green]agenthub is up[/]  API {system.api_url}  dashboard {system.dashboard_url}")
        if system.token_generated:
            console.print(f"API token (generated, kept in {settings.data_dir / 'api_token'}): {system.api_token}")
        if not settings.ray_address:  # a local Ray: the system lives as long as this process
            asyncio.run(_until_stopped())
    finally:
        console.print(down(system))  # on a cluster: only disconnects, saying how to stop it there


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@app.command()
def down(
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default AGENTHUB_RAY_ADDRESS, else auto)")
    ] = None,
    wait: Annotated[
        float | None,
        typer.Option(help="seconds to let deliveries under way finish first (default AGENTHUB_DRAIN_TIMEOUT_S, 10)"),
    ] = None,
) -> None:
    """Stop what `agenthub up --address` runs in a cluster: the HTTP app, the orchestrator (after the deliveries
    under way finished and every checkpoint is saved) and every agenthub actor (and the embedded Postgres, if
    DATABASE_URL is unset). The event log is kept; `up` resumes from it."""
    from cluster.bootstrap import stop_deployment

    configure_logging()
    settings = _settings(address, drain_timeout_s=wait)
    if not settings.ray_address:
        settings = settings.model_copy(update={"ray_address": "auto"})
    with _cluster_required(settings.ray_address):
        stopped = stop_deployment(settings)
    for what in stopped:
        console.print(what)
    console.print("[bold]agenthub is down[/]" if stopped else "nothing of agenthub was running")


@app.command()
def demo(port: Annotated[int | None, typer.Option(help="HTTP port (default 8000)")] = None) -> None:
    """The main job: start everything, talk to an agent over HTTP, kill it, recover it, replay it."""
    from cluster.demo import run_demo

    configure_logging()
    settings = _settings(port=port)
    with _cluster_required(settings.ray_address):
        raise typer.Exit(run_demo(settings, console))


@team_app.command("demo")
def team_demo(port: Annotated[int | None, typer.Option(help="HTTP port (default 8000)")] = None) -> None:
    """QA writes tests, the developer makes them pass in a real git repo, the tech lead reviews and merges;
    the CEO loop makes more work when idle; the V-team votes on a decision."""
    from cluster.team_demo import run_team_demo

    configure_logging()
    settings = _settings(port=port)
    with _cluster_required(settings.ray_address):
        raise typer.Exit(run_team_demo(settings, console))


@app.command()
def fork(
    at: Annotated[int, typer.Option("--at", min=1, max=POSITION_MAX, help="copy the run up to this log position")],
    run: Annotated[str | None, typer.Option(help="the run to fork (default: the run of the event at --at)")] = None,
    model: Annotated[str | None, typer.Option(help="model for the new run")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="ROLE=PROMPT: a role's system prompt in the new run")] = None,
) -> None:
    """Start a new team run from any point of an earlier one, with another model or prompt."""
    from actors.agents.team.history import fork_run

    prompts: dict[str, str] = {}
    for p in prompt or []:
        role, eq, text = p.partition("=")
        if not eq or not role.strip():
            raise typer.BadParameter(f"expected ROLE=TEXT, got {p!r}", param_hint="'--prompt'")
        prompts[role.strip()] = text

    async def go() -> str:
        store = await _open_store(get_settings())
        run_id = run
        if run_id is None:
            # the event at exactly --at: positions have gaps (a rolled-back append), and the first event after one
            # may be another run's
            (event,) = await store.read_all(at - 1, limit=1) or [None]
            if event is None or event.position != at or "run_id" not in event.data:
                raise typer.BadParameter(f"no run event at position {at}; pass --run", param_hint="'--at'")
            run_id = event.data["run_id"]
        return await fork_run(store, run_id, at, model=model, prompts=prompts)

    new_run = asyncio.run(go())
    console.print(f"forked into run {new_run}; the team carries it on when agenthub is up")


@events_app.command("tail")
def events_tail(
    from_position: Annotated[
        int | None, typer.Option("--from", min=0, max=POSITION_MAX, help="start after this position")
    ] = None,
    stream: Annotated[str | None, typer.Option(help="only this stream")] = None,
    follow: Annotated[bool, typer.Option(help="keep following new events")] = True,
) -> None:
    """Print events as JSON: the history after --from, then (with --follow) live."""

    async def run() -> None:
        from storage.eventlog import AfterPosition

        store = await _open_store(get_settings())
        if not follow:
            pos = from_position or 0
            while batch := await store.read_all(pos, stream=stream, limit=1000):
                for e in batch:
                    console.print_json(e.model_dump_json())
                pos = batch[-1].position
            return
        start = await store.head_cursor() if from_position is None else AfterPosition(from_position)
        async for batch, _ in store.subscribe(start):
            for e in batch:
                if stream is None or e.stream == stream:
                    console.print_json(e.model_dump_json())

    asyncio.run(run())


@app.command()
def replay(stream: str) -> None:
    """Rebuild a stream's state from the log (chat streams re-run the agent's decisions; no LLM is called)."""
    from actors.agents.agent import fold_agent

    async def run() -> int:
        store = await _open_store(get_settings())
        events = await store.read_stream(stream)
        if not events:
            console.print(f"[red]stream {stream!r} has no events[/]")
            return 1
        console.print(f"{stream}: {len(events)} events, version {events[-1].version}")
        if stream.startswith("agent-"):
            return await _replay_agent(store, fold_agent(events))
        if stream.startswith("run-"):
            return await _replay_run(store, stream.removeprefix("run-"))
        counts: dict[str, int] = {}
        for e in events:
            counts[e.type] = counts.get(e.type, 0) + 1
        console.print_json(json.dumps(counts))
        return 0

    raise typer.Exit(asyncio.run(run()))


async def _replay_agent(store: Any, state: Any) -> int:
    from actors.agents.replay import replay_agent

    console.print_json(state.model_dump_json())
    report = await replay_agent(store, state.agent_id)
    console.print(
        f"replayed {report.streams} chats, {report.messages} messages, {report.verified_replies} replies "
        f"verified, {len(report.mismatches)} mismatches, {report.completions_from_log} completions read from the log "
        f"(a replay has no provider to call), {report.unanswered} messages unanswered (nothing recorded to compare)"
    )
    for m in report.mismatches:
        console.print(f"[red]mismatch[/] {m}")
    return 1 if report.mismatches else 0


async def _replay_run(store: Any, run_id: str) -> int:
    from actors.agents.team.history import replay_run

    report = await replay_run(store, run_id)
    statuses: dict[str, int] = {}
    for t in report.tasks.values():
        statuses[t.status] = statuses.get(t.status, 0) + 1
    console.print(
        f"replayed run {run_id}: {report.events} events, {len(report.tasks)} tasks {statuses}, "
        f"{len(report.decisions)} decisions, {len(report.memory)} memory notes, "
        f"{len(report.mismatches)} mismatches (a fold of the log: no provider is called)"
    )
    for m in report.mismatches:
        console.print(f"[red]mismatch[/] {m}")
    return 1 if report.mismatches else 0


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="Parquet file to write")],
    from_position: Annotated[
        int, typer.Option("--from-position", min=0, max=POSITION_MAX, help="export events after this position")
    ] = 0,
) -> None:
    """Write the event log to a Parquet file."""
    from storage.export import export_parquet

    async def run() -> int:
        store = await _open_store(get_settings())
        # the events to write, counted: positions have gaps (a rolled-back append still uses up its positions)
        total = await store.fetchval("SELECT count(*) FROM events WHERE position > $1", from_position)
        with Progress(
            TextColumn("exporting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as bar:
            task = bar.add_task("export", total=total)

            done = 0

            def advance(k: int) -> None:
                nonlocal done
                done += k
                bar.update(task, completed=done, total=max(total, done))  # more: appended while exporting

            n = await export_parquet(store, out, from_position, progress=advance)
        console.print(f"wrote {n} events to {out}")
        return n

    asyncio.run(run())


if __name__ == "__main__":
    app()

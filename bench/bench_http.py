"""HTTP message → reply latency through Ray Serve, the log, the agent runner and the scripted provider.

Why: this is what a user of the API waits for; it crosses every component (ingress, log append, routing,
the agent's entity host, the agent's LLM router, the reply waiter), so it is the figure the others add up to.
Each client is its own keep-alive connection and its own chat, sending its next message when the last reply came.
The clients are a minimal HTTP/1.1 client on httptools (``bench/http_client.py``): the load generator shares the
same two cores, so a heavier client (aiohttp, httpx) would be measured as the system's latency. Beside the figures,
the same
clients against a route that does no work (an unknown path: 404) show what Ray Serve and FastAPI alone allow
on this machine. Run from the repository root (not while another Ray job is using this machine):

    python -m bench.bench_http [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvloop

from bench.common import (
    Row,
    at_least,
    at_most,
    cpu_by_process,
    fmt_rate,
    parser,
    percentile,
    print_table,
    quiet_logs,
    running_system,
    ticks,
    with_machine_speed,
)
from bench.http_client import HttpConnection
from storage.eventlog import EventLog

if TYPE_CHECKING:
    from cluster.bootstrap import System

TOKEN = "bench-token"
# Every message's text is new (round, client, number), so every reply calls the provider: a chat's request is its
# last 40 exchanges, and once a round repeats the texts of one before, it is the same request, which the LLM
# router answers from its completion cache, a third cheaper in the runner (docs/architecture.md, "Speed").
ROUNDS = itertools.count(1)


@dataclass(frozen=True)
class Sizes:
    clients: int = 20
    messages: int = 50
    warmup: int = 20
    grown_log: int = 100_000  # events added before the last round: does a reply cost more as the log grows?

    @classmethod
    def quick(cls) -> Sizes:
        return cls(clients=10, messages=10, warmup=10, grown_log=10_000)


Request = Callable[[HttpConnection, str, str, str], Awaitable[int]]


@dataclass
class Results:
    latencies: list[float]
    statuses: Counter[int]
    elapsed: float


@contextlib.asynccontextmanager
async def connection(system: System) -> AsyncIterator[HttpConnection]:
    conn = await HttpConnection.open(system.api_url, {"Authorization": f"Bearer {TOKEN}"})
    try:
        yield conn
    finally:
        conn.close()


async def call(conn: HttpConnection, method: str, path: str, body: object = None, expect: int = 200) -> dict:
    status, data = await conn.request(method, path, body)
    if status != expect:
        raise RuntimeError(f"{method} {path}: {status} {data.decode(errors='replace')}")
    answer: dict = json.loads(data)
    return answer


async def create_agent(conn: HttpConnection) -> str:
    body = {"name": "bench agent", "settings": {"provider": "scripted"}}
    agent_id: str = (await call(conn, "POST", "/api/v1/agents", body, expect=201))["id"]
    started = await call(conn, "POST", f"/api/v1/agents/{agent_id}/start")
    if started["status"] != "running":
        raise RuntimeError(f"agent did not start: {started}")
    return agent_id


async def send(conn: HttpConnection, agent_id: str, chat: str, text: str, timeout: float | None = None) -> int:
    query = f"?timeout={timeout:g}" if timeout else ""
    body = {"text": text, "chat_id": chat}
    status, _ = await conn.request("POST", f"/api/v1/agents/{agent_id}/messages{query}", body, timeout=120)
    return status


async def nothing(conn: HttpConnection, *_: str) -> int:
    """A request that crosses HAProxy, the replica and FastAPI's routing, and does nothing else."""
    status, _ = await conn.request("GET", "/no-such-route")
    return status


async def grow_log(system: System, events: int) -> None:
    """Append ``events`` that no actor subscribes to: every subscriber still reads past them, and the log's
    indexes are that much larger, as in a system that has run for a while."""
    store = await EventLog.connect(system.database_url, max_size=2, run_migrations=False)
    try:
        for start in range(0, events, 1000):
            await store.append(f"benchfill-{start // 1000 % 50}", ticks(min(1000, events - start), start))
    finally:
        await store.close()


async def warm_up(system: System, agent_id: str, sizes: Sizes) -> float:
    """One message first (the orchestrator starts the agent's runner), then one per remaining chat."""
    t0 = time.perf_counter()
    async with connection(system) as conn:
        deadline = time.perf_counter() + 90
        while (status := await send(conn, agent_id, "c0", "hello", timeout=60)) != 200:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"warm-up: no reply from the agent within 90 s (last status {status})")
            if status != 202:  # 202: recorded, reply still pending; anything else: give the system a moment
                await asyncio.sleep(0.5)

    async def one(chat: str) -> int:
        async with connection(system) as conn:
            return await send(conn, agent_id, chat, "hello", timeout=60)

    statuses = await asyncio.gather(*(one(f"c{i % sizes.clients}") for i in range(1, sizes.warmup)))
    if any(s != 200 for s in statuses):
        print(f"warning: warm-up statuses {Counter(statuses)}")
    return time.perf_counter() - t0


async def run_clients(system: System, agent_id: str, sizes: Sizes, request: Request = send) -> Results:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    go = asyncio.Event()

    round_ = next(ROUNDS)

    async def client(i: int) -> None:
        async with connection(system) as conn:
            await nothing(conn)  # open the connection before the clock starts
            await go.wait()
            for k in range(sizes.messages):
                t = time.perf_counter()
                status = await request(conn, agent_id, f"c{i}", f"message {k} from client {i} in round {round_}")
                latencies.append(time.perf_counter() - t)
                statuses[status] += 1

    tasks = [asyncio.create_task(client(i)) for i in range(sizes.clients)]
    await asyncio.sleep(0.5)
    t0 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    return Results(latencies, statuses, time.perf_counter() - t0)


async def measure(system: System, sizes: Sizes) -> list[Row]:
    async with connection(system) as conn:
        agent_id = await create_agent(conn)
    warm_s = await warm_up(system, agent_id, sizes)
    cpu0 = cpu_by_process()
    res = await run_clients(system, agent_id, sizes)
    cpu1 = cpu_by_process()
    by_process = {g: cpu1[g] - cpu0.get(g, 0.0) for g in cpu1}
    cpu = sum(by_process.values())
    lone = sorted((await run_clients(system, agent_id, Sizes(clients=1, messages=sizes.messages))).latencies)
    floor = await run_clients(system, agent_id, sizes, nothing)
    floor_lat = sorted(floor.latencies)
    floor_rate = sum(floor.statuses.values()) / floor.elapsed
    await grow_log(system, sizes.grown_log)
    await warm_up(system, agent_id, sizes)  # its replies come once the orchestrator has read past the new events
    grown = await run_clients(system, agent_id, sizes)
    grown_lat = sorted(grown.latencies)
    lat = sorted(res.latencies)
    p50, p95, p99 = (percentile(lat, q) * 1000 for q in (50, 95, 99))
    ok = res.statuses.get(200, 0)
    total = sizes.clients * sizes.messages
    other = ", ".join(f"{s}: {c}" for s, c in sorted(res.statuses.items()) if s != 200) or "none"
    return [
        Row(
            f"HTTP message -> reply, {sizes.clients} clients x {sizes.messages} messages: p50",
            f"{p50:.1f} ms",
            "<= 30 ms",
            at_most(p50, 30),
        ),
        Row("   p95", f"{p95:.1f} ms"),
        Row("   p99", f"{p99:.1f} ms", "<= 150 ms", at_most(p99, 150)),
        Row("   max", f"{lat[-1] * 1000:.1f} ms"),
        Row(f"   throughput ({ok:,} replies in {res.elapsed:.1f} s)", fmt_rate(ok / res.elapsed, "msg/s")),
        Row("   CPU per message, all processes on the machine", f"{cpu / max(ok, 1) * 1000:.1f} ms"),
        *(
            Row(f"      {group}", f"{seconds / max(ok, 1) * 1000:.2f} ms")
            for group, seconds in sorted(by_process.items(), key=lambda kv: -kv[1])
            if seconds > 0
        ),
        Row(
            f"   replies with status 200 (other statuses: {other})",
            f"{ok:,} of {total:,}",
            f"{total:,}",
            at_least(ok, total),
        ),
        Row(
            f"one client alone, {sizes.messages} messages: p50 / p99",
            f"{percentile(lone, 50) * 1000:.1f} / {percentile(lone, 99) * 1000:.1f} ms",
        ),
        Row(
            "the same clients on a route that does nothing (Ray Serve + FastAPI floor): p50 / p99",
            f"{percentile(floor_lat, 50) * 1000:.1f} / {percentile(floor_lat, 99) * 1000:.1f} ms",
        ),
        Row("   throughput", fmt_rate(floor_rate, "req/s")),
        Row(
            f"the first figure again, after {sizes.grown_log:,} more events in the log: p50 / p99",
            f"{percentile(grown_lat, 50) * 1000:.1f} / {percentile(grown_lat, 99) * 1000:.1f} ms",
        ),
        Row(
            "   throughput",
            fmt_rate(grown.statuses.get(200, 0) / grown.elapsed, "msg/s"),
        ),
        Row(f"   warm-up ({sizes.warmup} messages, runner start included)", f"{warm_s:.1f} s"),
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    quiet_logs()
    sizes = Sizes.quick() if args.quick else Sizes()
    t0 = time.perf_counter()

    def run() -> list[Row]:
        with running_system(TOKEN) as (system, started_s):
            rows = uvloop.run(measure(system, sizes))  # the load generator: as little CPU per request as it can
        return [*rows, Row("   system start (Postgres, Ray, orchestrator, Serve)", f"{started_s:.1f} s")]

    rows = with_machine_speed(run)  # the machine measured with nothing else running, before and after
    print_table(f"HTTP API with the scripted provider ({time.perf_counter() - t0:.0f} s in all)", rows)


if __name__ == "__main__":
    main()

"""Orchestration overhead per team task step (time outside the provider), with the scripted provider.

Every step of a task is an append to its stream; the gap between consecutive appends is the time the system
spent producing the later one. For ``llm.completed`` steps the provider's own latency is subtracted, so what is
left is routing, queueing, folding, deciding and appending. Target: p50 under 10 ms on this machine.

A warm-up run comes first, so the figures are the steady state, not the role actors' start-up (reported on
its own line).
"""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import ray

from actors.agents.team.actors import ensure_team
from actors.agents.team.script import TEAM_SCRIPT
from bench.common import Row, at_most, machine_cpu_s, parser, percentile, print_table, quiet_logs, running_system
from cluster.bootstrap import System
from storage.eventlog import EventLog

ROLES = ("cfo", "legal", "product", "risk", "security")


async def step_overheads(store: EventLog, ids: list[str]) -> tuple[list[float], float]:
    """Milliseconds between consecutive appends to each task's stream, less the provider's own latency."""
    overheads: list[float] = []
    provider = 0.0
    for t in ids:
        events = await store.read_all(stream=f"task-{t}")  # read_all carries each event's transaction id
        for prev, cur in itertools.pairwise(events):
            if cur.tx_id == prev.tx_id:
                continue  # events of one append are one step
            gap = (cur.recorded_at - prev.recorded_at).total_seconds()
            if cur.type == "llm.completed":
                provider += cur.data["latency_ms"] / 1000
                gap -= cur.data["latency_ms"] / 1000
            overheads.append(max(gap, 0.0) * 1000)
    return sorted(overheads), provider


async def run_tasks(system: System, http: httpx.AsyncClient, n_tasks: int, goal: str) -> tuple[list[str], float]:
    """Start a run with ``n_tasks`` tasks spread over the roles; wait until all are done."""
    body = {"goal": goal, "provider": "scripted:team", "max_generated_tasks": 0}
    run = (await http.post("/api/v1/runs", json=body)).json()["run_id"]
    ids = []
    started = time.perf_counter()
    for i in range(n_tasks):
        body = {"title": f"{goal} task {i}", "role": ROLES[i % len(ROLES)]}
        ids.append((await http.post(f"/api/v1/runs/{run}/tasks", json=body)).json()["task_id"])
    deadline = time.monotonic() + 60
    while True:  # one query of the task read model per poll, so polling barely loads the system it measures
        rows = (await http.get("/api/v1/tasks", params={"run_id": run, "limit": 1000})).json()
        statuses = {r["task_id"]: r["status"] for r in rows}
        if all(statuses.get(t) in ("completed", "failed") for t in ids):
            return ids, time.perf_counter() - started
        if time.monotonic() > deadline:
            stuck = [t for t in ids if statuses.get(t) not in ("completed", "failed")]
            timeline = (await http.get(f"/api/v1/tasks/{stuck[0]}/timeline")).json()
            status = await system.orchestrator.status.remote()
            pings = {r: await ray.get_actor(f"role:{r}", namespace="agenthub").ping.remote() for r in ROLES}
            raise TimeoutError(
                f"tasks not finished: {stuck}; {[(e['type'], e['actor']) for e in timeline]} {status} {pings}"
            )
        await asyncio.sleep(0.1)


async def measure(system: System, n_tasks: int) -> list[Row]:
    """A warm-up run first (one task per role: the role actors start, connect and import on first use), then
    the measured run; each figure is read back from the log."""
    await ensure_team(system.orchestrator)
    await ray.get_actor("llm", namespace=system.settings.ray_namespace).set_script.remote("team", TEAM_SCRIPT)
    headers = {"Authorization": f"Bearer {system.api_token}"}
    async with httpx.AsyncClient(base_url=system.api_url, headers=headers, timeout=60) as http:
        _, warm_s = await run_tasks(system, http, len(ROLES), "warm-up")
        lone, _ = await run_tasks(system, http, 1, "alone")
        cpu0 = machine_cpu_s()
        ids, wall = await run_tasks(system, http, n_tasks, "bench")
        cpu = machine_cpu_s() - cpu0
    store = await EventLog.connect(system.database_url, run_migrations=False)
    overheads, provider = await step_overheads(store, ids)
    alone, _ = await step_overheads(store, lone)
    await store.close()
    p50, p95 = percentile(overheads, 50), percentile(overheads, 95)
    return [
        Row(f"{n_tasks} tasks at once (work, self-validate, fix, peer review)", f"{wall:.1f} s"),
        Row("   steps measured", f"{len(overheads)}"),
        Row("   overhead per step p50", f"{p50:.1f} ms", "< 10 ms", at_most(p50, 10)),
        Row("   overhead per step p95 (queueing behind the same role included)", f"{p95:.1f} ms"),
        Row("   CPU per step, all processes on the machine", f"{cpu / len(overheads) * 1000:.1f} ms"),
        Row("   time inside the provider", f"{provider * 1000:.0f} ms total"),
        Row(
            f"one task alone ({len(alone)} steps): overhead per step p50 / p95",
            f"{percentile(alone, 50):.1f} / {percentile(alone, 95):.1f} ms",
        ),
        Row(f"warm-up run ({len(ROLES)} tasks, role actors starting)", f"{warm_s:.1f} s"),
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    quiet_logs()
    with running_system("bench") as (system, _):
        rows = asyncio.run(measure(system, 5 if args.quick else 20))
    print_table("team orchestration overhead (scripted provider)", rows)


if __name__ == "__main__":
    main()

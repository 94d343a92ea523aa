"""Orchestration overhead per team task step (time outside the provider), with the scripted provider.

Every step of a task is an append to its stream; the gap between consecutive appends is the time the system
spent producing the later one. For ``llm.completed`` steps the provider's own latency is subtracted, so what is
left is routing, queueing, folding, deciding and appending. Target: p50 under 10 ms on this machine.

A warm-up run comes first, so the figures are the steady state, not the role actors' start-up (reported on
its own line). Then three loads: tasks one at a time (the target applies here: this is the overhead itself),
one task per role at once, and 20 at once. Under the last one a step also waits for the CPU that the other
tasks' steps use, so its wall-clock gaps measure contention for 2 cores; CPU per step, summed over every
process on the machine, shows the cost.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import httpx
import ray

from actors.agents.team.actors import ensure_team
from actors.agents.team.script import TEAM_SCRIPT
from bench.common import (
    Row,
    at_most,
    machine_cpu_s,
    parser,
    percentile,
    print_table,
    quiet_logs,
    running_system,
    with_machine_speed,
)
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
    started = time.perf_counter()
    bodies = [{"title": f"{goal} task {i}", "role": ROLES[i % len(ROLES)]} for i in range(n_tasks)]
    created = await asyncio.gather(*(http.post(f"/api/v1/runs/{run}/tasks", json=b) for b in bodies))
    ids = [r.json()["task_id"] for r in created]
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


@dataclass
class Load:
    """Steps measured under one load: their overheads, and the machine's CPU seconds while they ran."""

    name: str
    overheads: list[float]
    provider_s: float
    wall_s: float
    cpu_s: float

    def rows(self, idle_cpu_per_s: float, target: bool = False) -> list[Row]:
        p50, p95 = percentile(self.overheads, 50), percentile(self.overheads, 95)
        n = len(self.overheads)
        busy = max(0.0, self.cpu_s - idle_cpu_per_s * self.wall_s)
        p50_row = Row("   overhead per step p50", f"{p50:.1f} ms")
        if target:
            p50_row = Row(p50_row.name, p50_row.measured, "< 10 ms", at_most(p50, 10))
        return [
            Row(f"{self.name}: {n} steps in {self.wall_s:.1f} s", ""),
            p50_row,
            Row("   overhead per step p95", f"{p95:.1f} ms"),
            Row("   CPU per step, all processes on the machine, above idle", f"{busy / n * 1000:.1f} ms"),
            Row("   time inside the provider", f"{self.provider_s * 1000:.0f} ms in all"),
        ]


async def load(system: System, http: httpx.AsyncClient, store: EventLog, name: str, runs: list[int]) -> Load:
    """Run ``runs`` one after another (each: that many tasks at once) and measure every step of every task."""
    cpu0, ids, wall = machine_cpu_s(), [], 0.0
    for i, n in enumerate(runs):
        got, seconds = await run_tasks(system, http, n, f"{name} {i}")
        ids += got
        wall += seconds
    cpu = machine_cpu_s() - cpu0
    overheads, provider = await step_overheads(store, ids)
    return Load(name, overheads, provider, wall, cpu)


async def measure(system: System, n_tasks: int) -> list[Row]:
    """A warm-up run first (one task per role: the role actors start, connect and import on first use), then
    three loads: tasks one at a time (the overhead itself), one per role at once, and ``n_tasks`` at once
    (on 2 cores a step then also waits for the CPU the other tasks' steps use)."""
    await ensure_team(system.orchestrator)
    await ray.get_actor("llm", namespace=system.settings.ray_namespace).set_script.remote("team", TEAM_SCRIPT)
    headers = {"Authorization": f"Bearer {system.api_token}"}
    store = await EventLog.connect(system.database_url, run_migrations=False)
    try:
        async with httpx.AsyncClient(base_url=system.api_url, headers=headers, timeout=60) as http:
            _, warm_s = await run_tasks(system, http, len(ROLES), "warm-up")
            cpu0 = machine_cpu_s()
            await asyncio.sleep(2)  # what the machine burns doing nothing: Ray's and Serve's own upkeep
            idle = (machine_cpu_s() - cpu0) / 2
            alone = await load(system, http, store, "tasks one at a time", [1] * len(ROLES))
            per_role = await load(system, http, store, f"{len(ROLES)} tasks at once, one per role", [len(ROLES)])
            burst = await load(system, http, store, f"{n_tasks} tasks at once", [n_tasks])
    finally:
        await store.close()
    return [
        *alone.rows(idle, target=True),
        *per_role.rows(idle),
        *burst.rows(idle),
        Row("idle machine, CPU per second", f"{idle * 1000:.0f} ms"),
        Row(f"warm-up run ({len(ROLES)} tasks, role actors starting)", f"{warm_s:.1f} s"),
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    quiet_logs()

    def run() -> list[Row]:
        with running_system("bench") as (system, _):
            return asyncio.run(measure(system, 5 if args.quick else 20))

    print_table("team orchestration overhead (scripted provider)", with_machine_speed(run))


if __name__ == "__main__":
    main()

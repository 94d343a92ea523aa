"""Orchestration overhead per team task step (time outside the provider), with the scripted provider.

Every step of a task is an append to its stream; the gap between consecutive appends is the time the system
spent producing the later one. For ``llm.completed`` steps the provider's own latency is subtracted, so what is
left is routing, queueing, folding, deciding and appending. Target: p50 under 10 ms on this machine.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import ray

from actors.agents.team.actors import ensure_team
from actors.agents.team.script import TEAM_SCRIPT
from bench.common import Row, at_most, parser, percentile, print_table, quiet_logs, running_system
from cluster.bootstrap import System
from storage.eventlog import EventLog

ROLES = ("cfo", "legal", "product", "risk", "security")


async def measure(system: System, n_tasks: int) -> list[Row]:
    await ensure_team(system.orchestrator)
    await ray.get_actor("llm", namespace=system.settings.ray_namespace).set_script.remote("team", TEAM_SCRIPT)
    headers = {"Authorization": f"Bearer {system.api_token}"}
    async with httpx.AsyncClient(base_url=system.api_url, headers=headers, timeout=60) as http:
        run = (
            await http.post(
                "/api/v1/runs", json={"goal": "bench", "provider": "scripted:team", "max_generated_tasks": 0}
            )
        ).json()["run_id"]
        ids = []
        started = time.perf_counter()
        for i in range(n_tasks):
            body = {"title": f"bench task {i}", "role": ROLES[i % len(ROLES)]}
            ids.append((await http.post(f"/api/v1/runs/{run}/tasks", json=body)).json()["task_id"])
        deadline = time.monotonic() + 60
        while True:
            statuses = [(await http.get(f"/api/v1/tasks/{t}")).json()["status"] for t in ids]
            if all(s in ("completed", "failed") for s in statuses):
                break
            if time.monotonic() > deadline:
                stuck = [t for t, st in zip(ids, statuses, strict=True) if st not in ("completed", "failed")]
                timeline = (await http.get(f"/api/v1/tasks/{stuck[0]}/timeline")).json()
                status = await system.orchestrator.status.remote()
                pings = {r: await ray.get_actor(f"role:{r}", namespace="agenthub").ping.remote() for r in ROLES}
                raise TimeoutError(
                    f"tasks not finished: {stuck}; {[(e['type'], e['actor']) for e in timeline]} {status} {pings}"
                )
            await asyncio.sleep(0.5)
        wall = time.perf_counter() - started
    store = await EventLog.connect(system.database_url, run_migrations=False)
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
    await store.close()
    overheads.sort()
    p50, p95 = percentile(overheads, 50), percentile(overheads, 95)
    return [
        Row("tasks (work, self-validate, fix, peer review)", f"{n_tasks} in {wall:.1f} s"),
        Row("steps measured", f"{len(overheads)}"),
        Row("overhead per step p50", f"{p50:.1f} ms", "≤ 10 ms", at_most(p50, 10)),
        Row("overhead per step p95", f"{p95:.1f} ms"),
        Row("time inside the provider", f"{provider * 1000:.0f} ms total"),
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    quiet_logs()
    with running_system("bench") as (system, _):
        rows = asyncio.run(measure(system, 5 if args.quick else 20))
    print_table("team orchestration overhead (scripted provider)", rows)


if __name__ == "__main__":
    main()

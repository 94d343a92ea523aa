"""``agenthub team demo``: the role-agent team builds a feature test-first in a real git repository."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import ray
from git import Repo
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from actors.agents.team.actors import ensure_team
from actors.agents.team.script import TEAM_SCRIPT
from actors.tools import run_pytest
from cluster.bootstrap import System, down, up
from cluster.settings import Settings


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}")


def run_team_demo(settings: Settings, console: Console) -> int:
    with console.status("starting Postgres, Ray, the orchestrator and Ray Serve…"):
        system = up(settings)
    try:
        with console.status("starting the team…"):
            asyncio.run(ensure_team(system.orchestrator))
            llm = ray.get_actor("llm", namespace=settings.ray_namespace)
            ray.get(llm.set_script.remote("team", TEAM_SCRIPT))
        return _demo(system, console)
    finally:
        console.print(down(system))


def _demo(system: System, console: Console) -> int:
    http = httpx.Client(base_url=system.api_url, headers={"Authorization": f"Bearer {system.api_token}"}, timeout=60)
    run = (
        http.post(
            "/api/v1/runs",
            json={
                "goal": "Launch online bookings for the summer fleet",
                "strategy": ["Publish prices for every car class", "Make the rental contract ready for online signing"],
                "provider": "scripted:team",
                "model": "gpt-4o-mini",  # the scripted provider stands in for it and is priced as it
                "max_generated_tasks": 2,
                "ceo_interval_s": 1.0,
            },
        )
        .raise_for_status()
        .json()
    )
    run_id = run["run_id"]
    console.print(f"run [bold]{run_id}[/]: {run['goal']}")
    task = (
        http.post(
            f"/api/v1/runs/{run_id}/tasks",
            json={
                "title": "Implement slugify for car listing URLs",
                "kind": "implement",
                "priority": "high",
                "description": "slugify(text) in slugify_util.py: lowercase words joined by dashes, "
                "punctuation dropped.",
            },
        )
        .raise_for_status()
        .json()
    )
    decision = (
        http.post(f"/api/v1/runs/{run_id}/decisions", json={"question": "Lease 20 more cars for the summer?"})
        .raise_for_status()
        .json()
    )

    def run_done() -> bool:
        return http.get(f"/api/v1/runs/{run_id}").json()["status"] == "completed"

    with console.status("the team is working (QA → Developer → tests → fixes → Tech Lead → merge; CEO loop)…"):
        _wait(run_done, 180, "the run to complete")
        made = _wait(
            lambda: (d := http.get(f"/api/v1/decisions/{decision['decision_id']}").json())["decision"] and d,
            60,
            "the group decision",
        )

    timeline = Table("#", "event", "by", "what", title=f"task {task['task_id']}")
    for e in http.get(f"/api/v1/tasks/{task['task_id']}/timeline").json():
        d = e["data"]
        what = d.get("output") or d.get("comments") or d.get("result") or d.get("purpose") or d.get("role") or ""
        timeline.add_row(str(e["version"]), e["type"], e["actor"] or "", escape(str(what))[:70])
    console.print(timeline)

    workspace = system.settings.data_dir.resolve() / "workspaces" / run_id
    repo = Repo(workspace)
    console.print("[bold]git log (main)[/]")
    for c in repo.iter_commits("main"):
        console.print(f"  {c.hexsha[:10]} {escape(c.summary)}")
    repo.git.checkout("main")
    report = asyncio.run(run_pytest(workspace, timeout_s=60))
    console.print(f"tests on main: {report.passed}/{report.count} passed")

    tasks = Table("task", "role", "status", "attempts", title="all tasks of the run")
    for t in http.get("/api/v1/tasks", params={"run_id": run_id}).json():
        tasks.add_row(escape(t["title"]), t["role"], t["status"], str(t["attempts"]))
    console.print(tasks)

    console.print(f"[bold]group decision[/]: {made['question']} → {made['decision']} ({escape(made['rationale'])})")
    for role, v in made["verdicts"].items():
        console.print(f"  {role}: {v['verdict']} — criteria: {', '.join(v['criteria'])}")

    usage = http.get(f"/api/v1/runs/{run_id}/usage", params={"fresh": "true"}).raise_for_status().json()
    cost = Table("role", "model", "calls", "tokens", "cost $", title="usage")
    for r in usage["by_role"]:
        cost.add_row(
            r["role"],
            r["model"],
            str(r["calls"]),
            str(r["prompt_tokens"] + r["completion_tokens"]),
            f"{r['cost_usd']:.4f}",
        )
    console.print(cost)
    console.print(f"total: {usage['calls']} LLM calls, {usage['tokens']} tokens, ${usage['cost_usd']:.4f}")
    ok = report.ok and made["decision"] in ("approve", "reject", "conditional")
    console.print("[bold green]team demo complete[/]" if ok else "[bold red]team demo found a problem[/]")
    return 0 if ok else 1

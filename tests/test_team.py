"""The role-agent team on the running system: TDD in a real git repo, self-validation, reviews, the CEO loop,
group decisions, timeouts, budgets, replay and fork — all with the scripted provider over the real LLM actor."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import httpx
import psutil
import pytest
import ray
from git import Repo

from actors.agents.team.actors import ensure_team
from actors.agents.team.history import fork_run, replay_run
from actors.agents.team.script import SLUG_TESTS, TEAM_SCRIPT
from actors.llm.actor import LLMActor, complete_via
from actors.llm.providers import ChatMessage, CompletionRequest, ProviderError, ScriptRule
from actors.tools import run_pytest
from cluster.bootstrap import System, runtime_config
from storage.eventlog import EventLog
from tests.conftest import eventually


@pytest.fixture(scope="module")
async def team(system: System) -> System:
    await ensure_team(system.orchestrator)
    llm = ray.get_actor("llm", namespace=system.settings.ray_namespace)
    await llm.set_script.remote("team", TEAM_SCRIPT)
    return system


async def slow_provider(system: System) -> str:
    """A scripted model that thinks for 3 s before every answer."""
    llm = ray.get_actor("llm", namespace=system.settings.ray_namespace)
    return str(await llm.set_script.remote("slow", [ScriptRule(pattern="", text="still thinking", delay_s=3)]))


async def new_run(http: httpx.AsyncClient, **kw: Any) -> str:
    body = {"goal": "summer launch", "provider": "scripted:team", "max_generated_tasks": 0, **kw}
    r = await http.post("/api/v1/runs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["run_id"]


async def new_task(http: httpx.AsyncClient, run_id: str, **kw: Any) -> str:
    r = await http.post(f"/api/v1/runs/{run_id}/tasks", json={"title": "a task", **kw})
    assert r.status_code == 201, r.text
    return r.json()["task_id"]


async def task_done(http: httpx.AsyncClient, task_id: str, status: str = "completed", timeout: float = 90) -> dict:
    async def check() -> bool:
        return (await http.get(f"/api/v1/tasks/{task_id}")).json()["status"] == status

    await eventually(check, timeout=timeout, what=f"task {task_id} {status}")
    return (await http.get(f"/api/v1/tasks/{task_id}")).json()


async def timeline(http: httpx.AsyncClient, task_id: str) -> list[dict]:
    return (await http.get(f"/api/v1/tasks/{task_id}/timeline")).json()


async def test_tdd_flow_writes_tests_first_fixes_and_merges(team: System, http: httpx.AsyncClient) -> None:
    run_id = await new_run(http)
    task_id = await new_task(
        http,
        run_id,
        title="Implement slugify",
        kind="implement",
        priority="high",
        description="slugify(text) in slugify_util.py",
    )
    state = await task_done(http, task_id)
    events = await timeline(http, task_id)
    types = [e["type"] for e in events]
    written = [e["data"] for e in events if e["type"] == "task.files_written"]
    assert written[0]["role"] == "qa" and "tests/test_slugify.py" in written[0]["files"]  # tests come first
    assert types.index("task.files_written") < types.index("task.assigned")
    attempts = [e["data"] for e in events if e["type"] == "task.attempted"]
    assert [a["valid"] for a in attempts] == [False, True]  # the naive first attempt fails, the fix passes
    assert attempts[0]["tests"]["failed"] == 2 and attempts[1]["tests"]["passed"] == 3
    assert any("test_drops_punctuation" in i for i in attempts[0]["issues"])
    reviewed = next(e["data"] for e in events if e["type"] == "task.reviewed")
    assert reviewed["role"] == "tech_lead" and reviewed["approved"]
    merged = next(e["data"] for e in events if e["type"] == "task.merged")
    assert state["merged"] == merged["commit"] and merged["approved_by"] == "tech_lead"

    repo = Repo(team.settings.data_dir.resolve() / "workspaces" / run_id)
    main = repo.commit("main")
    assert main.hexsha == merged["commit"] and "tech_lead" in main.message
    assert "slugify_util.py" in main.tree and "tests" in main.tree
    repo.git.checkout("main")
    report = await run_pytest(repo.working_dir, timeout_s=60)
    assert report.ok and report.passed == 3  # the written tests really pass on main


async def test_a_developer_killed_while_its_tests_run_records_no_verdict_on_that_run(
    team: System, http: httpx.AsyncClient
) -> None:
    """Ray kills an actor's children (pytest) before the actor, whose code runs on for a moment: the killed run
    read as "no tests ran" was recorded as a failed attempt, and the developer started in its place made the next
    one (the chaos soak saw one step write the same files twice)."""
    ns = team.settings.ray_namespace
    llm = ray.get_actor("llm", namespace=ns)
    slow = SLUG_TESTS + "\n\ndef test_takes_a_while():\n    import time\n\n    time.sleep(3)\n"
    tests_rule = ScriptRule(pattern=r"PHASE=tests", structured={"files": {"tests/test_slugify.py": slow}})
    provider = await llm.set_script.remote("slow-tests", [tests_rule, *TEAM_SCRIPT])
    run_id = await new_run(http, provider=provider)
    task_id = await new_task(http, run_id, title="Implement slugify", kind="implement")
    workspace = str(team.settings.data_dir.resolve() / "workspaces" / run_id)

    def pytest_running() -> bool:
        procs = psutil.process_iter(["cmdline", "cwd"])
        return any(p.info["cwd"] == workspace and "pytest" in (p.info["cmdline"] or []) for p in procs)

    async def tests_run() -> bool:
        return await asyncio.to_thread(pytest_running)

    await eventually(tests_run, timeout=60, what="the developer's first pytest run")
    developer = ray.get_actor("role:developer", namespace=ns)
    pid = await developer.__ray_call__.remote(lambda actor: os.getpid())
    ray.kill(developer, no_restart=True)  # the orchestrator starts it again

    await task_done(http, task_id, timeout=120)
    attempts = [e["data"] for e in await timeline(http, task_id) if e["type"] == "task.attempted"]
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert attempts[0]["tests"] == {"passed": 2, "failed": 2, "errors": 0, "count": 4, "timed_out": False}
    assert attempts[1]["valid"] and attempts[1]["tests"]["passed"] == 4
    new = ray.get_actor("role:developer", namespace=ns)
    assert await new.__ray_call__.remote(lambda actor: os.getpid()) != pid


@pytest.mark.skipif(sys.platform != "linux", reason="a run's processes are found through /proc")
async def test_a_role_started_again_ends_what_its_killed_predecessors_tests_left_running(team: System) -> None:
    """A killed role's pytest dies with it, what its tests started in the background does not: the role started
    in its place ends that, instead of leaving it to the next test run on the machine, which may be hours away."""
    from actors.tools.test_runner import _OWNER_VAR

    ns = team.settings.ray_namespace
    legal = ray.get_actor("role:legal", namespace=ns)
    pid = await legal.__ray_call__.remote(lambda actor: os.getpid())
    # marked as a run of a runner that is gone (no such pid), as a killed role's background process is
    orphan = await asyncio.create_subprocess_exec("sleep", "120", env={**os.environ, _OWNER_VAR: "999999999:0"})
    try:
        ray.kill(legal, no_restart=True)  # the orchestrator starts it again

        async def started_again() -> bool:
            try:
                new = ray.get_actor("role:legal", namespace=ns)
                return bool(await new.__ray_call__.remote(lambda actor: os.getpid()) != pid)
            except (ValueError, ray.exceptions.RayActorError):
                return False

        await eventually(started_again, timeout=60, what="legal started again")

        assert await asyncio.wait_for(orphan.wait(), 10) == -signal.SIGKILL
    finally:
        if orphan.returncode is None:
            orphan.kill()
            await orphan.wait()


async def test_self_validation_retries_then_peer_review_and_memory(team: System, http: httpx.AsyncClient) -> None:
    run_id = await new_run(http)
    task_id = await new_task(http, run_id, title="Price list for July", role="cfo", priority="low")
    state = await task_done(http, task_id)
    scores = [(a["attempt"], a["valid"], a["score"]) for a in state["attempts"]]
    assert scores == [(1, False, 4.0), (2, True, 8.5)]  # below 7: fixed on the second attempt
    assert state["approved_by"] == "tech_lead" and "prices per day" in state["result"]

    async def remembered() -> bool:
        """The note and the task's activity both projected. The note is a spawn of the step that records
        `task.completed`, and an entity host appends a step's spawns first (each keyed by the message, so a step
        decided again spawns nothing twice), then the step's own events: a delivery to the projector can end
        between the two, so seeing one does not mean the other is there."""
        mem = (await http.get("/api/v1/roles/cfo/memory")).json()
        done = {"task.attempted", "task.completed"} <= {a["type"] for a in mem["activity"] if a["task_id"] == task_id}
        return done and any(m["key"] == "Price list for July" for m in mem["memory"])

    await eventually(remembered, what="the cfo's memory and the task's activity")


async def test_priority_queue_and_http_validation(team: System, http: httpx.AsyncClient) -> None:
    run_id = await new_run(http)
    r = await http.post(f"/api/v1/runs/{run_id}/tasks", json={"title": "x", "role": "janitor"})
    assert r.status_code == 422 and "unknown role" in r.json()["detail"]
    r = await http.post(f"/api/v1/runs/{run_id}/tasks", json={"title": "x", "priority": 3})
    assert r.status_code == 422
    r = await http.post(f"/api/v1/runs/{run_id}/tasks", json={"title": "x", "kind": "implement", "role": "developer"})
    assert r.status_code == 422 and "tests are written first" in r.json()["detail"]
    assert (await http.post("/api/v1/runs/run_nope/tasks", json={"title": "x"})).status_code == 404
    assert (await http.get("/api/v1/tasks/nope")).status_code == 404
    await new_task(http, run_id, title="later", role="product", priority="low")
    high = await new_task(http, run_id, title="urgent", role="product", priority="high")
    listed = (await http.get("/api/v1/tasks", params={"run_id": run_id, "fresh": "true"})).json()
    assert len(listed) == 2 and listed[0]["task_id"] == high and listed[0]["priority"] == 1  # listed by priority


async def test_a_create_sent_again_with_its_idempotency_key_creates_nothing_more(
    team: System, http: httpx.AsyncClient, hub_log: EventLog
) -> None:
    """A client whose create got a 503 or lost its connection cannot know whether it was recorded: sent again
    with the same ``Idempotency-Key``, it gets the run, task or decision recorded the first time."""
    body = {"goal": "keyed", "provider": "scripted:team", "max_generated_tasks": 0}
    runs = [await http.post("/api/v1/runs", json=body, headers={"Idempotency-Key": "run-k1"}) for _ in range(2)]
    assert [r.status_code for r in runs] == [201, 201] and runs[0].json() == runs[1].json()
    run_id = runs[0].json()["run_id"]
    other = await http.post("/api/v1/runs", json={**body, "goal": "other"}, headers={"Idempotency-Key": "run-k1"})
    assert other.status_code == 422 and "already used" in other.json()["detail"]

    task = {"title": "keyed task", "role": "legal"}
    tasks = [
        await http.post(f"/api/v1/runs/{run_id}/tasks", json=task, headers={"Idempotency-Key": "task-k1"})
        for _ in range(2)
    ]
    assert [r.status_code for r in tasks] == [201, 201] and tasks[0].json()["task_id"] == tasks[1].json()["task_id"]
    unkeyed = await new_task(http, run_id, **task)  # without a key, the same body is a new task
    assert unkeyed != tasks[0].json()["task_id"]
    other = await http.post(
        f"/api/v1/runs/{run_id}/tasks", json={**task, "title": "another"}, headers={"Idempotency-Key": "task-k1"}
    )
    assert other.status_code == 422 and tasks[0].json()["task_id"] in other.json()["detail"]

    question = {"question": "ship it?", "voters": ["cfo", "risk"]}
    decisions = [
        await http.post(f"/api/v1/runs/{run_id}/decisions", json=question, headers={"Idempotency-Key": "dec-k1"})
        for _ in range(2)
    ]
    assert decisions[0].json()["decision_id"] == decisions[1].json()["decision_id"]

    created = await hub_log.read_where("type = 'task.created' AND data->>'run_id' = $1", run_id)
    assert sorted(e.data["task_id"] for e in created) == sorted([tasks[0].json()["task_id"], unkeyed])
    started = await hub_log.read_where("type = 'run.started' AND data->>'goal' = 'keyed'")
    assert [e.data["run_id"] for e in started] == [run_id]
    asked = await hub_log.read_where("type = 'decision.requested' AND data->>'run_id' = $1", run_id)
    assert len(asked) == 1
    await task_done(http, tasks[0].json()["task_id"])  # and the one task is worked once


async def test_task_past_its_timeout_is_escalated(team: System, http: httpx.AsyncClient, hub_log: EventLog) -> None:
    run_id = await new_run(http, provider=await slow_provider(team))  # no answer within the task's timeout
    task_id = await new_task(http, run_id, title="stuck", role="security", timeout_s=1)
    state = await task_done(http, task_id, status="failed", timeout=30)
    events = await hub_log.read_stream(f"task-{task_id}")
    types = [e.type for e in events]
    assert types.count("task.timed_out") == 2 and types.index("task.timed_out") < types.index("task.escalated")
    esc = next(e for e in events if e.type == "task.escalated")
    assert esc.data["from_role"] == "security" and esc.data["to_role"] == "ceo"
    assert "top of the escalation chain" in state["result"]  # the CEO timed out too: nobody above it


async def test_cancel_a_waiting_task(team: System, http: httpx.AsyncClient) -> None:
    run_id = await new_run(http, provider=await slow_provider(team))
    task_id = await new_task(http, run_id, title="not needed", role="legal", timeout_s=600)
    r = await http.post(f"/api/v1/tasks/{task_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    again = await http.post(f"/api/v1/tasks/{task_id}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert (await http.get(f"/api/v1/tasks/{task_id}")).json()["status"] == "cancelled"


async def test_ceo_loop_makes_work_when_idle_within_its_cap(team: System, http: httpx.AsyncClient) -> None:
    run_id = await new_run(
        http, strategy=["Publish prices", "Contract ready"], max_generated_tasks=2, ceo_interval_s=0.5
    )

    async def completed() -> bool:
        return (await http.get(f"/api/v1/runs/{run_id}")).json()["status"] == "completed"

    await eventually(completed, timeout=120, what="run completed")
    tasks = (await http.get("/api/v1/tasks", params={"run_id": run_id})).json()
    assert sorted(t["role"] for t in tasks) == ["cfo", "legal"]  # the cap: 2 generated, no more
    assert all(t["status"] == "completed" for t in tasks)
    run_stream = (await http.get(f"/api/v1/streams/run-{run_id}")).json()["events"]
    checks = [e["data"] for e in run_stream if e["type"] == "ceo.checked"]
    assert sum(c["generated"] for c in checks) == 2 and [c["generated"] for c in checks].count(2) == 1
    assert all(c["active"] == c["pending"] == 0 for c in checks if c["generated"])  # it made work only when idle
    assert run_stream[-1]["type"] == "run.completed" and len(checks) >= 2


async def test_group_decision_collects_parallel_verdicts(team: System, http: httpx.AsyncClient) -> None:
    run_id = await new_run(http)
    r = await http.post(f"/api/v1/runs/{run_id}/decisions", json={"question": "Lease 20 more cars?"})
    assert r.status_code == 202
    did = r.json()["decision_id"]

    async def made() -> bool:
        return (await http.get(f"/api/v1/decisions/{did}")).json()["decision"] is not None

    await eventually(made, timeout=60, what="decision")
    d = (await http.get(f"/api/v1/decisions/{did}")).json()
    assert set(d["verdicts"]) == {"cfo", "risk", "legal", "tech_lead"}
    assert d["verdicts"]["risk"]["verdict"] == "conditional" and d["verdicts"]["cfo"]["criteria"]
    assert d["decision"] == "approve" and d["votes"]["legal"] == "approve"
    bad = await http.post(f"/api/v1/runs/{run_id}/decisions", json={"question": "?", "voters": ["nobody"]})
    assert bad.status_code == 422


async def test_budget_exceeded_stops_work_with_a_clear_event(team: System, http: httpx.AsyncClient) -> None:
    run_id = await new_run(http, budget_usd=0)
    task_id = await new_task(http, run_id, title="spend nothing", role="product")
    state = await task_done(http, task_id, status="failed")
    assert "budget exceeded" in state["result"]
    run = (await http.get(f"/api/v1/streams/run-{run_id}")).json()["events"]
    assert "run.budget_exceeded" in [e["type"] for e in run]


async def test_a_failed_llm_call_fails_the_task_with_its_reason(team: System, http: httpx.AsyncClient) -> None:
    llm = ray.get_actor("llm", namespace=team.settings.ray_namespace)
    provider = await llm.set_script.remote("silent", [])  # no rules: its self-check answer is {}, not the schema
    run_id = await new_run(http, provider=provider)
    task_id = await new_task(http, run_id, title="check the fleet", role="product")
    state = await task_done(http, task_id, status="failed")
    assert "LLM call failed" in state["result"] and "'valid' is a required property" in state["result"]


async def test_the_llm_actor_restarts_with_its_scripts_and_calls_in_flight(
    team: System, http: httpx.AsyncClient, hub_log: EventLog
) -> None:
    ns = team.settings.ray_namespace
    llm = ray.get_actor("llm", namespace=ns)
    await llm.set_script.remote("team", TEAM_SCRIPT)  # the same rules again: nothing new to record
    registered = [e.data["name"] for e in await hub_log.read_stream("llm-scripts")]
    assert registered.count("team") == 1
    pid = await llm.__ray_call__.remote(lambda actor: os.getpid())
    question = [ChatMessage(role="user", content="are you there?")]
    slow = CompletionRequest(provider=await slow_provider(team), model="m", messages=question, cache=False)
    in_flight = asyncio.ensure_future(complete_via(llm, slow))
    await asyncio.sleep(0.5)
    ray.kill(llm, no_restart=False)  # Ray restarts it; the new process reads its scripts back from the log
    assert (await in_flight).text == "still thinking"  # the call was retried on the new process
    run_id = await new_run(http)
    task_id = await new_task(http, run_id, title="after the restart", role="product")
    state = await task_done(http, task_id)
    assert state["status"] == "completed"  # its every step asked scripted:team
    assert await ray.get_actor("llm", namespace=ns).__ray_call__.remote(lambda actor: os.getpid()) != pid


async def test_an_llm_actor_that_stays_dead_is_a_provider_error(team: System) -> None:
    config = runtime_config(team.settings, team.database_url)
    doomed = LLMActor.options(name="llm-doomed", namespace=team.settings.ray_namespace).remote(config)
    ray.kill(doomed, no_restart=True)
    request = CompletionRequest(provider="scripted", model="m", messages=[ChatMessage(role="user", content="hi")])
    with pytest.raises(ProviderError, match="the LLM actor is unavailable"):
        await complete_via(doomed, request)


async def test_replay_rebuilds_a_finished_run_without_the_provider(
    team: System, http: httpx.AsyncClient, hub_log: EventLog
) -> None:
    run_id = await new_run(http)
    task_id = await new_task(http, run_id, title="Implement slugify", kind="implement")
    await task_done(http, task_id)
    llm = ray.get_actor("llm", namespace=team.settings.ray_namespace)
    calls = await llm.provider_calls.remote()
    report = await replay_run(hub_log, run_id)
    assert await llm.provider_calls.remote() == calls  # the provider was never called
    assert report.mismatches == [] and report.tasks[task_id].status == "completed"
    listed = (await http.get("/api/v1/tasks", params={"run_id": run_id, "fresh": "true"})).json()
    assert {t["task_id"]: t["status"] for t in listed}[task_id] == "completed"  # projected: none comes after the damage
    await hub_log.execute("UPDATE team_tasks SET status = 'failed' WHERE task_id = $1", task_id)  # a bad read model
    (mismatch,) = (await replay_run(hub_log, run_id)).mismatches
    assert "read model says failed" in mismatch
    assert len(report.tasks[task_id].attempts) == 2 and report.tasks[task_id].merged


async def test_fork_continues_from_a_position_with_another_model(
    team: System, http: httpx.AsyncClient, hub_log: EventLog
) -> None:
    run_id = await new_run(http)
    task_id = await new_task(http, run_id, title="Price list", role="cfo")
    await task_done(http, task_id)
    original = await hub_log.read_stream(f"task-{task_id}")
    first_attempt = next(e for e in original if e.type == "task.attempted")
    new_run_id = await fork_run(hub_log, run_id, first_attempt.position, model="scripted-v2")
    new_task_id = task_id.replace(run_id, new_run_id)
    state = await task_done(http, new_task_id)
    forked = await hub_log.read_stream(f"task-{new_task_id}")
    models = [e.data["model"] for e in forked if e.type == "llm.completed"]
    assert models[:2] == ["scripted", "scripted"] and set(models[2:]) == {"scripted-v2"}  # new model after the fork
    assert [a["attempt"] for a in state["attempts"]] == [1, 2]
    assert await hub_log.read_stream(f"task-{task_id}") == original  # the original run is untouched
    usage = (await http.get(f"/api/v1/runs/{new_run_id}/usage", params={"fresh": "true"})).json()
    assert usage["calls"] >= len(models)  # the copied completions and the new model's (and the run's others)

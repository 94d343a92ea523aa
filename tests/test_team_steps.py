"""Single steps of the team's entities and actors, called directly: no Ray, no LLM, a real git repository and
pytest where a step uses them, and Postgres only for a fork."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tenacity import stop_after_attempt, wait_none

from actors.agents import team
from actors.agents.team.actors import CeoLoopActorImpl, RoleActorImpl
from actors.agents.team.decision import Decision, DecisionState, evolve_decision
from actors.agents.team.history import RUN_EVENTS, fork_run, run_events
from actors.agents.team.queue import TaskQueue
from actors.agents.team.run import MAX_FAILED_TICKS, STATUS_OF, TASK_STATUS_SQL, Run, RunState, evolve_run
from actors.agents.team.services import Completed, RunConfig, TeamServices
from actors.agents.team.task import Task, TaskState, _commit, evolve_task, finite
from actors.entity import Context, EntityHost, Spawn
from actors.llm.base import Completion, CompletionRequest, ProviderError
from actors.llm.budget import spent_usd
from events import NewEvent, RecordedEvent
from events.hub import AgentStarted, LLMCompleted
from events.system import TimerFired, TimerScheduled
from events.team import (
    DecisionRequested,
    DecisionVerdict,
    MemoryNoted,
    RunStarted,
    TaskCancelled,
    TaskCompleted,
    TaskCreated,
    TaskFailed,
    TaskStarted,
)
from storage.errors import StoreUnavailable
from storage.eventlog import EventLog
from tests.conftest import eventually

ADD_TESTS = "from add_util import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
ADD_CODE = "def add(a, b):\n    return a + b\n"


def recorded(n: NewEvent | dict[str, Any], stream: str = "task-r1.t1", position: int = 1) -> RecordedEvent:
    n = n if isinstance(n, NewEvent) else NewEvent.model_validate(n)
    return n.recorded(stream, position, position, tx_id=1)


def fold(evolve: Any, state: Any, decided: list[NewEvent | Spawn]) -> Any:
    for n in decided:
        if isinstance(n, NewEvent):
            state = evolve(state, recorded(n))
    return state


def message(type_: str, **data: Any) -> RecordedEvent:
    return recorded(NewEvent(type=type_, data=data))


class StoreStub:
    """What a step reads from the store besides its own stream: the run's task counts."""

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return []


async def no_llm(request: CompletionRequest) -> Completion:
    raise AssertionError("this step needs no LLM call")


def services(tmp_path: Path, complete: Any = no_llm, **run: Any) -> TeamServices:
    svc = TeamServices(StoreStub(), complete, tmp_path)  # type: ignore[arg-type]
    svc._runs["r1"] = RunConfig(run_id="r1", workspace="ws", **run)  # tmp_path / "ws"
    return svc


def implement_task(**kw: Any) -> TaskState:
    base: dict[str, Any] = dict(
        task_id="r1.t1", run_id="r1", title="add", description="add(a, b)", kind="implement", status="in_progress"
    )
    return TaskState(**{**base, **kw})


# ---- tasks ----


async def test_a_repeated_finish_finds_the_branch_merged(tmp_path: Path) -> None:
    """The merge is done but its append lost a conflict (or the actor crashed): the step runs again."""
    svc = services(tmp_path)
    run = await svc.run("r1")
    branch, _ = await svc.in_workspace(run, lambda root: _commit(root, "r1.t1", {"add_util.py": ADD_CODE}, "dev"))
    s = implement_task(role="developer", phase="code", branch=branch, approved_by="tech_lead")
    task = Task("developer", svc)
    first = await task.finish(s, run)
    again = await task.finish(s, run)  # the state still says "not merged": the append never happened
    merged = [e.data["commit"] for e in (first + again) if isinstance(e, NewEvent) and e.type == "task.merged"]
    assert len(merged) == 2 and merged[0] == merged[1]
    assert [e.type for e in again if isinstance(e, NewEvent)] == ["task.merged", "task.completed"]


async def test_a_deadline_without_a_time_zone_is_utc(tmp_path: Path) -> None:
    """A naive deadline (as the API accepted it) must not break the task's start with naive-vs-aware."""
    near = (datetime.now(UTC) + timedelta(seconds=30)).replace(tzinfo=None).isoformat()
    created = {"task_id": "r1.t1", "run_id": "r1", "title": "t", "role": "cfo", "priority": 5, "deadline": near}
    s = evolve_task(TaskState(), recorded(NewEvent(type="task.created", data=created)))  # as an old event stored it
    out = Task("cfo", services(tmp_path)).start(s)
    assert next(e.type for e in out if isinstance(e, NewEvent)) == "task.priority_raised"  # 30 s is near
    assert s.deadline is not None and s.deadline.tzinfo is not None
    event = TaskCreated(task_id="x", run_id="r1", title="t", role="cfo", deadline=datetime(2030, 1, 1))
    assert event.model_dump(mode="json")["deadline"] == "2030-01-01T00:00:00Z"


async def test_an_implement_task_escalated_to_the_tech_lead_is_worked_by_it(tmp_path: Path) -> None:
    """QA or the developer timed out: the tech lead takes over the phase (it used to fail an assertion)."""
    svc = services(tmp_path)
    tests_done = {"tests:1": Completed(text="", structured={"files": {"tests/test_add.py": ADD_TESTS}})}
    s = implement_task(role="tech_lead", phase="tests", completions=tests_done)
    lead = Task("tech_lead", svc)
    wrote = await lead.decide(s, message("task.assigned"), Context("task-r1.t1"))
    assert [e.type for e in wrote if isinstance(e, NewEvent)] == ["task.files_written", "task.assigned"]
    s = fold(evolve_task, s, wrote)
    assert s.role == "developer" and s.phase == "code" and s.tests  # the developer codes against them
    s.role, s.status = "tech_lead", "in_progress"  # the developer timed out too; the tech lead started it
    s.completions["code:1"] = Completed(text="", structured={"files": {"add_util.py": ADD_CODE}})
    coded = await lead.decide(s, message("task.assigned"), Context("task-r1.t1"))
    (attempt,) = [e for e in coded if isinstance(e, NewEvent) and e.type == "task.attempted"]
    assert attempt.data["role"] == "tech_lead" and attempt.data["valid"] and attempt.data["tests"]["passed"] == 1
    assert "ROLE=tech_lead" in lead_prompt(s)


def lead_prompt(s: TaskState) -> str:
    from actors.agents.team.roles import role

    return role("tech_lead").code_prompt(s, 1, 1, s.tests, [])


async def test_team_requests_name_who_records_the_answer(tmp_path: Path) -> None:
    """So that a cached answer for a step retried after a conflict still carries its cost (LLMRouter)."""
    asked: list[CompletionRequest] = []

    async def complete(request: CompletionRequest) -> Completion:
        asked.append(request)
        return Completion(
            text="done", provider="scripted", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1
        )

    s = TaskState(task_id="r1.t1", run_id="r1", title="t", role="cfo", status="in_progress")
    await Task("cfo", services(tmp_path, complete)).decide(s, message("task.assigned"), Context("task-r1.t1"))
    assert [r.record_key for r in asked] == ["task-r1.t1:work:1"]


# ---- the CEO loop and group decisions ----


def buggy_llm() -> tuple[Any, list[str]]:
    """An LLM client with a bug of its own (a ``RuntimeError``, not a provider's error), and the calls it got."""
    calls: list[str] = []

    async def broken(request: CompletionRequest) -> Completion:
        calls.append(request.last_user_message())
        raise RuntimeError("the client's own bug")

    return broken, calls


def ceo_loop(category: str, host: EntityHost[Any]) -> CeoLoopActorImpl:
    """The CEO loop's actor code with one host, outside Ray; its retries do not wait."""
    actor = object.__new__(CeoLoopActorImpl)
    actor.subscriber, actor.failures, actor.store_retry_wait = "ceo:loop", 0, wait_none()
    actor.hosts = {category: host}
    return actor


def failing(error: ProviderError) -> Any:
    async def complete(request: CompletionRequest) -> Completion:
        raise error

    return complete


async def test_a_failed_llm_call_does_not_stop_the_ceo_loop(tmp_path: Path) -> None:
    svc = services(tmp_path, failing(ProviderError("openai: HTTP 500")), strategy=["grow"], max_generated_tasks=3)
    run = Run(svc)
    s = RunState(run_id="r1", status="running")
    s = fold(evolve_run, s, [run.tick_timer(s, 1.0)])
    for tick in range(1, MAX_FAILED_TICKS + 1):
        fired = message("timer.fired", timer_id=f"ceo:r1:{tick}", scheduled_position=1, payload={"tick": tick})
        out = await run.decide(s, fired, Context("run-r1"))
        types = [e.type for e in out if isinstance(e, NewEvent)]
        checked = next(e for e in out if isinstance(e, NewEvent) and e.type == "ceo.checked")
        assert "HTTP 500" in checked.data["error"]
        if tick < MAX_FAILED_TICKS:
            assert types == ["ceo.checked", "timer.scheduled"]  # the next tick is scheduled
        else:
            assert types == ["ceo.checked", "run.completed"]  # it stops asking after failing every time
        s = fold(evolve_run, s, out)
        assert await run.decide(s, fired, Context("run-r1")) == []  # the tick is handled
    assert s.status == "completed"


async def test_a_ceo_tick_that_keeps_failing_is_a_failed_tick_and_the_loop_goes_on(
    tmp_path: Path, eventlog: EventLog
) -> None:
    """A tick whose handling raised something no answer caused (here the LLM client's own bug) is tried again, then
    recorded as a failed tick with the next one scheduled. It used to fail on the first try and be skipped: the
    tick scheduled no next one, and the run stayed running with nothing left to wake it."""
    broken, calls = buggy_llm()
    svc = TeamServices(eventlog, broken, tmp_path)
    actor = ceo_loop("run", EntityHost(Run(svc), eventlog))
    await eventlog.append("run-r1", [NewEvent.of(RunStarted(run_id="r1", goal="g", strategy=["grow"]))])
    for tick in range(1, MAX_FAILED_TICKS + 1):
        last = (await eventlog.read_stream("run-r1"))[-1]
        await actor._handle_one(last)  # the run's start, then each failed tick, schedules the next tick
        fired = TimerFired(timer_id=f"ceo:r1:{tick}", scheduled_position=last.position, payload={"tick": tick})
        appended = await eventlog.append("run-r1", [NewEvent.of(fired)])
        (trigger,) = await eventlog.read_stream("run-r1", appended.versions[0])
        await actor._handle_one(trigger)
        assert len(calls) == 3 * tick and actor.failures == tick  # three tries each, then recorded
        checked = (await eventlog.read_stream("run-r1"))[-2:]
        assert checked[0].type == "ceo.checked" and checked[0].meta.causation_id == trigger.id
        assert checked[0].data["error"] == "tick failed: RuntimeError: the client's own bug"
        if tick < MAX_FAILED_TICKS:
            assert checked[1].type == "timer.scheduled" and checked[1].data["payload"]["tick"] == tick + 1
        else:
            assert checked[1].type == "run.completed" and "stopped after 3 failed ticks" in checked[1].data["summary"]
    before = len(await eventlog.read_stream("run-r1"))
    await actor.hosts["run"].record_crash(trigger, RuntimeError("again"))  # a completed run: nothing more
    assert len(await eventlog.read_stream("run-r1")) == before


async def test_the_ceo_loop_counts_tasks_from_the_log_not_the_read_model(tmp_path: Path, eventlog: EventLog) -> None:
    """The projector has projected none of these (it is not running here): a tick counts them all the same, so
    it neither makes more work while the last tick's tasks are pending nor completes the run under them."""
    asked: list[str] = []

    async def complete(request: CompletionRequest) -> Completion:
        asked.append(request.last_user_message())
        return Completion(
            text="",
            structured={"tasks": []},
            provider="s",
            model="m",
            prompt_tokens=1,
            completion_tokens=1,
            latency_ms=1,
        )

    await eventlog.append("run-r1", [NewEvent.of(RunStarted(run_id="r1", goal="g", strategy=["grow"]))])
    svc = TeamServices(eventlog, complete, tmp_path)
    run = Run(svc)
    s = RunState(run_id="r1", status="running")

    async def tick() -> list[str]:
        nonlocal s
        s = fold(evolve_run, s, [run.tick_timer(s, 1.0)])
        fired = message(
            "timer.fired", timer_id=f"ceo:r1:{s.scheduled}", scheduled_position=1, payload={"tick": s.scheduled}
        )
        decided: list[NewEvent | Spawn] = []
        while not any(isinstance(e, NewEvent) and e.type == "ceo.checked" for e in decided):
            out = await run.decide(s, fired, Context("run-r1"))  # a completion is recorded first, then decided on
            s = fold(evolve_run, s, out)
            decided += out
        checked = next(e for e in decided if isinstance(e, NewEvent) and e.type == "ceo.checked")
        return [checked.data["active"], checked.data["pending"], [e.type for e in decided if isinstance(e, NewEvent)]]

    ids = {"task_id": "r1.g1.1", "run_id": "r1"}
    await eventlog.append("task-r1.g1.1", [NewEvent.of(TaskCreated(**ids, title="first", role="cfo"))])
    assert await tick() == [0, 1, ["ceo.checked", "timer.scheduled"]]
    await eventlog.append("task-r1.g1.1", [NewEvent.of(TaskStarted(**ids, role="cfo", timer_id="t"))])
    assert await tick() == [1, 0, ["ceo.checked", "timer.scheduled"]] and asked == []
    await eventlog.append("task-r1.g1.1", [NewEvent.of(TaskCompleted(**ids, role="cfo", result="done"))])
    assert await tick() == [0, 0, ["llm.completed", "ceo.checked", "run.completed"]]
    assert len(asked) == 1 and "first" in asked[0]  # the done task's title, from its first event

    def scans(node: dict[str, Any]) -> list[str]:
        return [node["Node Type"], *(n for child in node.get("Plans", []) for n in scans(child))]

    for i in range(20):  # a log that has more in it than this run
        await eventlog.append(f"agent-a{i}", [NewEvent.of(AgentStarted()) for _ in range(100)])
    async with eventlog.connection() as c:  # a tick every few seconds must not read the whole log
        await c.execute("ANALYZE events")
        [plan] = json.loads(await c.fetchval(f"EXPLAIN (FORMAT JSON) {TASK_STATUS_SQL}", "r1", list(STATUS_OF)))
        assert "Seq Scan" not in scans(plan["Plan"])


async def test_a_failed_voter_keeps_the_others_verdicts(tmp_path: Path) -> None:
    async def ask_voter(voter: str, decision_id: str, run_id: str, question: str) -> list[dict[str, Any]]:
        if voter == "risk":
            raise ProviderError("risk: HTTP 429 after 4 attempts")
        if voter == "legal":
            raise RuntimeError("role:legal is gone")
        verdict = DecisionVerdict(
            decision_id=decision_id, run_id=run_id, role=voter, criteria=["c"], verdict="approve", rationale="ok"
        )
        return [NewEvent.of(verdict).model_dump(mode="json")]

    decided = {"decision": "approve", "rationale": "the CFO approves"}

    async def complete(request: CompletionRequest) -> Completion:
        assert "- risk: gave no verdict" in request.last_user_message()
        return Completion(
            text=json.dumps(decided),
            structured=decided,
            provider="s",
            model="m",
            prompt_tokens=1,
            completion_tokens=1,
            latency_ms=1,
        )

    decision = Decision(services(tmp_path, complete), ask_voter)
    s = evolve_decision(
        DecisionState(),
        recorded(
            NewEvent(
                type="decision.requested",
                data={"decision_id": "d1", "run_id": "r1", "question": "?", "voters": ["cfo", "risk", "legal"]},
            )
        ),
    )
    ctx = Context("decision-d1")
    votes = await decision.decide(s, message("decision.requested"), ctx)
    assert sorted(e.type for e in votes if isinstance(e, NewEvent)) == [
        "decision.verdict",
        "decision.voter_failed",
        "decision.voter_failed",
    ]
    s = fold(evolve_decision, s, votes)
    s = fold(evolve_decision, s, await decision.decide(s, message("decision.requested"), ctx))  # the CEO's answer
    (made,) = await decision.decide(s, message("decision.requested"), ctx)
    assert isinstance(made, NewEvent) and made.type == "decision.made"
    assert made.data["decision"] == "approve" and made.data["votes"] == {"cfo": "approve"}


async def test_a_failed_ceo_call_fails_the_decision(tmp_path: Path) -> None:
    decision = Decision(services(tmp_path, failing(ProviderError("boom"))), None)  # type: ignore[arg-type]
    s = DecisionState(decision_id="d1", run_id="r1", question="?", voters=["cfo"])
    s.verdicts["cfo"] = {"verdict": "approve", "rationale": "ok"}
    out = await decision.decide(s, message("decision.requested"), Context("decision-d1"))
    assert [e.type for e in out if isinstance(e, NewEvent)] == ["decision.failed"]
    s = fold(evolve_decision, s, out)
    assert s.decision is None and "boom" in (s.failure or "")
    assert await decision.decide(s, message("decision.requested"), Context("decision-d1")) == []


async def test_a_decision_whose_step_keeps_failing_fails_instead_of_staying_open(
    tmp_path: Path, eventlog: EventLog
) -> None:
    """The CEO's call raised something no answer caused (the LLM client's own bug): tried three times, then the
    decision is recorded as failed with the error. It was skipped, and the decision stayed open for ever."""
    broken, calls = buggy_llm()
    svc = TeamServices(eventlog, broken, tmp_path)
    actor = ceo_loop("decision", EntityHost(Decision(svc, None), eventlog))  # type: ignore[arg-type]
    await eventlog.append("run-r1", [NewEvent.of(RunStarted(run_id="r1", goal="g"))])
    ids = {"decision_id": "d1", "run_id": "r1"}
    verdict = DecisionVerdict(**ids, role="cfo", criteria=["c"], verdict="approve", rationale="ok")
    asked = NewEvent.of(DecisionRequested(**ids, question="?", voters=["cfo"]))
    await eventlog.append("decision-d1", [asked, NewEvent.of(verdict)])
    trigger = (await eventlog.read_stream("decision-d1"))[-1]
    await actor._handle_one(trigger)
    events = await eventlog.read_stream("decision-d1")
    assert len(calls) == 3 and actor.failures == 1
    assert [e.type for e in events] == ["decision.requested", "decision.verdict", "decision.failed"]
    assert events[-1].data["reason"] == "step failed: RuntimeError: the client's own bug"
    await actor.hosts["decision"].record_crash(trigger, RuntimeError("again"))  # failed already: nothing more
    assert len(await eventlog.read_stream("decision-d1")) == 3


# ---- a role actor's worker ----


class FlakyHost:
    """A task host whose store is away for the first ``failures`` calls."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.active: dict[str, Any] = {}
        self.entity = Task("cfo", services(Path()))  # says which task a message is for

    async def handle(self, trigger: RecordedEvent) -> list[RecordedEvent]:
        self.calls += 1
        if self.calls <= self.failures:
            raise StoreUnavailable("event store unavailable: ConnectionRefusedError")
        return []


@pytest.mark.parametrize("failures", [2, 5])
async def test_a_store_outage_does_not_drop_a_task_step(failures: int) -> None:
    """The routed event was acknowledged already: the step is retried, and after the retries it waits in the
    queue again instead of waiting for its timeout."""
    actor = object.__new__(RoleActorImpl)
    actor.name, actor.subscriber, actor.queue, actor.current, actor.failures = "cfo", "role:cfo", TaskQueue(), None, 0
    actor.store_retry_wait, actor.store_retry_stop, actor.store_retry_pause_s = wait_none(), stop_after_attempt(3), 0
    host = FlakyHost(failures)
    actor.hosts = {"task": host}  # type: ignore[dict-item]
    await actor.handle(message("task.created", task_id="r1.t1", priority=5))
    worker = asyncio.create_task(actor._work())
    try:
        for _ in range(200):
            if host.calls > failures:
                break
            await asyncio.sleep(0.01)
    finally:
        worker.cancel()
    assert host.calls == failures + 1 and len(actor.queue) == 0


async def test_a_ceo_loop_step_leaves_a_store_outage_to_the_orchestrator() -> None:
    """The CEO loop, unlike a role, acknowledges nothing before it is done: an outage propagates at once and the
    orchestrator delivers the event again, where retrying here would hold the delivery for up to a minute."""
    host = FlakyHost(1)
    actor = ceo_loop("task", host)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable):
        await actor._handle_one(message("timer.fired", task_id="r1.t1"))
    assert host.calls == 1 and actor.failures == 0


async def test_a_step_that_keeps_failing_fails_its_task_at_once(tmp_path: Path, eventlog: EventLog) -> None:
    """An error no answer caused (here the LLM client's own bug) is tried again, then recorded as the task's
    failure with the error; the task used to wait for its timeout (300 s), to be handed to the next role."""
    broken, calls = buggy_llm()
    svc = TeamServices(eventlog, broken, tmp_path)
    svc._runs["r1"] = RunConfig(run_id="r1", workspace="ws")
    ids = {"task_id": "r1.t1", "run_id": "r1"}
    await eventlog.append("task-r1.t1", [NewEvent.of(TaskCreated(**ids, title="budget", role="cfo"))])
    started = await eventlog.append("task-r1.t1", [NewEvent.of(TaskStarted(**ids, role="cfo", timer_id="t1"))])
    (trigger,) = await eventlog.read_stream("task-r1.t1", started.versions[0])

    actor = object.__new__(RoleActorImpl)
    actor.name, actor.subscriber, actor.queue, actor.current, actor.failures = "cfo", "role:cfo", TaskQueue(), None, 0
    actor.store_retry_wait, actor.store_retry_stop, actor.step_attempts = wait_none(), stop_after_attempt(3), 3
    actor.hosts = {"task": EntityHost(Task("cfo", svc), eventlog)}
    await actor.handle(trigger)
    worker = asyncio.create_task(actor._work())
    try:

        async def failed() -> bool:
            return (await eventlog.read_stream("task-r1.t1"))[-1].type == "task.failed"

        await eventually(failed, what="the task to fail")
    finally:
        worker.cancel()
    event = (await eventlog.read_stream("task-r1.t1"))[-1]
    assert len(calls) == 3 and actor.failures == 1 and len(actor.queue) == 0
    assert event.data["reason"] == "step failed at cfo: RuntimeError: the client's own bug"
    assert event.meta.causation_id == trigger.id and event.data["role"] == "cfo"
    await actor.hosts["task"].record_crash(trigger, RuntimeError("again"))  # a finished task: nothing more
    assert [e.type for e in await eventlog.read_stream("task-r1.t1")] == ["task.created", "task.started", "task.failed"]


async def test_a_completion_paid_for_a_task_cancelled_meanwhile_is_still_recorded(
    tmp_path: Path, eventlog: EventLog
) -> None:
    """The completion's append loses to the cancel (a version conflict); deciding again on the cancelled task does
    nothing, so the completion was lost, and the run's budget never counted what it cost."""
    ids = {"task_id": "r1.t1", "run_id": "r1"}

    async def cancelled_meanwhile(request: CompletionRequest) -> Completion:
        await eventlog.append("task-r1.t1", [NewEvent.of(TaskCancelled(**ids, reason="no longer needed"))])
        return Completion(
            text="done", provider="p", model="m", prompt_tokens=9, completion_tokens=3, latency_ms=5, cost_usd=0.25
        )

    svc = TeamServices(eventlog, cancelled_meanwhile, tmp_path)
    svc._runs["r1"] = RunConfig(run_id="r1", workspace="ws", budget_usd=10.0)
    await eventlog.append("task-r1.t1", [NewEvent.of(TaskCreated(**ids, title="budget", role="cfo"))])
    started = await eventlog.append("task-r1.t1", [NewEvent.of(TaskStarted(**ids, role="cfo", timer_id="t1"))])
    (trigger,) = await eventlog.read_stream("task-r1.t1", started.versions[0])
    appended = await EntityHost(Task("cfo", svc), eventlog).handle(trigger)

    events = await eventlog.read_stream("task-r1.t1")
    assert [e.type for e in events] == ["task.created", "task.started", "task.cancelled", "llm.completed"]
    assert [e.id for e in appended] == [events[-1].id] and events[-1].meta.causation_id == trigger.id
    assert events[-1].data["purpose"] == "work:1" and await spent_usd(eventlog, "run_id", "r1") == 0.25


async def test_an_answer_the_log_cannot_hold_fails_its_task_at_once_and_keeps_its_cost(
    tmp_path: Path, eventlog: EventLog
) -> None:
    """Not tried again three times with the same cached answer, then recorded as a crash without its cost."""
    ids = {"task_id": "r1.t1", "run_id": "r1"}

    async def nul(request: CompletionRequest) -> Completion:
        text = "half an answer\x00"  # Postgres's JSON cannot hold it
        return Completion(
            text=text, provider="p", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1, cost_usd=0.5
        )

    svc = TeamServices(eventlog, nul, tmp_path)
    svc._runs["r1"] = RunConfig(run_id="r1", workspace="ws", budget_usd=10.0)
    await eventlog.append("task-r1.t1", [NewEvent.of(TaskCreated(**ids, title="budget", role="cfo"))])
    started = await eventlog.append("task-r1.t1", [NewEvent.of(TaskStarted(**ids, role="cfo", timer_id="t1"))])
    (trigger,) = await eventlog.read_stream("task-r1.t1", started.versions[0])
    await EntityHost(Task("cfo", svc), eventlog).handle(trigger)
    *_, paid, failed = await eventlog.read_stream("task-r1.t1")
    assert (paid.type, paid.data["text"], failed.type) == ("llm.completed", "", "task.failed")
    assert (
        failed.data["reason"].startswith("the step's result could not be recorded: ") and "NUL" in failed.data["reason"]
    )
    assert await spent_usd(eventlog, "run_id", "r1") == 0.5


def test_an_answer_the_previous_role_asked_for_is_no_answer_for_the_next() -> None:
    """A developer's completion that lost its append to the escalation is still recorded (it was paid for), after
    the hand-over: the tech lead asks for its own instead of taking the developer's as its answer."""

    def answer(by: str) -> RecordedEvent:
        return message("llm.completed", agent_id=by, purpose="code:1", text=f"by {by}", structured=None)

    s = evolve_task(implement_task(role="developer", phase="code"), answer("developer"))
    assert s.completions["code:1"].text == "by developer"  # the developer's own, for its attempt 1
    s = evolve_task(s, message("task.assigned", task_id="r1.t1", run_id="r1", role="tech_lead", phase="code"))
    assert "code:1" not in s.completions  # recorded before the hand-over: not the tech lead's attempt 1
    s = evolve_task(s, answer("developer"))
    assert "code:1" not in s.completions  # recorded after it (late: it was paid for)
    s = evolve_task(s, answer("tech_lead"))
    assert s.completions["code:1"].text == "by tech_lead"


def test_a_crash_in_a_role_the_task_was_taken_from_fails_nothing(tmp_path: Path) -> None:
    """The developer's step kept failing while the task's timeout handed it to the tech lead: the tech lead's task
    goes on. What the crashed step's decision paid for is kept, without its text, either way."""
    s = implement_task(role="tech_lead", phase="code")
    crash, ctx, trigger = RuntimeError("a bug"), Context("task-r1.t1"), message("task.started")
    paid = LLMCompleted(
        agent_id="developer", provider="openai", model="m", text="the code", prompt_tokens=5, completion_tokens=7,
        total_tokens=12, latency_ms=3.0, cost_usd=0.25, request_hash="h", run_id="r1", purpose="code:1",
    )  # fmt: skip
    decided = [NewEvent.of(paid), NewEvent.of(TaskFailed(**s.ids(), role="developer", reason="never recorded"))]
    assert Task("developer", services(tmp_path)).crashed(s, trigger, ctx, crash, []) == []
    (kept,) = Task("developer", services(tmp_path)).crashed(s, trigger, ctx, crash, decided)
    assert kept.type == "llm.completed" and kept.data["cost_usd"] == 0.25 and kept.data["text"] == ""
    (failed,) = Task("tech_lead", services(tmp_path)).crashed(s, trigger, ctx, crash, [])
    assert failed.type == "task.failed" and failed.data["reason"] == "step failed at tech_lead: RuntimeError: a bug"
    kept, failed = Task("tech_lead", services(tmp_path)).crashed(s, trigger, ctx, crash, decided)
    assert (kept.type, kept.data["total_tokens"], failed.type) == ("llm.completed", 12, "task.failed")
    disk = OSError(28, "No space left on device", str(tmp_path / "ws" / "add.py"))  # the workspaces dir is tmp_path
    (failed,) = Task("tech_lead", services(tmp_path)).crashed(s, trigger, ctx, disk, [])
    assert failed.data["reason"] == "step failed at tech_lead: OSError: [Errno 28] No space left on device: 'ws/add.py'"


async def test_a_roles_cache_of_run_configs_stays_bounded(
    eventlog: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(team.services, "MAX_CACHED_RUNS", 2)
    svc = TeamServices(eventlog, lambda _: None, tmp_path)
    for i in range(5):
        await eventlog.append(f"run-c{i}", [NewEvent.of(RunStarted(run_id=f"c{i}", goal=f"goal {i}"))])
    for i in range(5):
        assert (await svc.run(f"c{i}")).goal == f"goal {i}"
        assert len(svc._runs) <= 2
    with pytest.raises(LookupError):
        await svc.run("nope")


# ---- fork ----


async def test_a_runs_events_are_found_through_indexes_not_a_scan_of_the_log(eventlog: EventLog) -> None:
    """Replay and fork read one run's events: its run and task streams, its decisions, and its notes in memory
    streams that roles share across runs; once a scan of the whole log, now two index lookups."""
    for i in range(30):
        await eventlog.append(f"chat-a/c{i}", [NewEvent.of(AgentStarted()) for _ in range(100)])

    def note(run: str) -> NewEvent:
        return NewEvent.of(MemoryNoted(role="developer", run_id=run, key="k", content=f"from {run}"))

    await eventlog.append("run-r9", [NewEvent.of(RunStarted(run_id="r9", goal="g"))])
    await eventlog.append("task-r9.t1", [NewEvent.of(TaskCreated(task_id="r9.t1", run_id="r9", title="t", role="qa"))])
    await eventlog.append("memory-developer", [note("r8"), note("r9"), note("r8")])
    ask = DecisionRequested(decision_id="d1", run_id="r9", question="q?", voters=["cfo"])
    await eventlog.append("decision-d1", [NewEvent.of(ask)])
    await eventlog.append(
        "task-r99.t1", [NewEvent.of(TaskCreated(task_id="r99.t1", run_id="r99", title="t", role="qa"))]
    )
    got = await run_events(eventlog, "r9")
    assert [(e.stream, e.type) for e in got] == [
        ("run-r9", "run.started"),
        ("task-r9.t1", "task.created"),
        ("memory-developer", "memory.noted"),
        ("decision-d1", "decision.requested"),
    ]
    assert got[2].data["content"] == "from r9" and [e.position for e in got] == sorted(e.position for e in got)

    def nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
        return [node, *(n for child in node.get("Plans", []) for n in nodes(child))]

    sql = f"EXPLAIN (FORMAT JSON) SELECT position FROM events WHERE {RUN_EVENTS} ORDER BY position"
    async with eventlog.connection() as c:
        for analyze in (False, True):  # before statistics on the run index exist, and after
            if analyze:
                await c.execute("ANALYZE events")
            [plan] = json.loads(await c.fetchval(sql, "run-r9", "task-r9.%", "r9", None))
            scans = [n["Node Type"] for n in nodes(plan["Plan"])]
            assert "Seq Scan" not in scans, (analyze, scans)


async def test_a_fork_shifts_pending_timers_by_the_time_since_the_fork_point(eventlog: EventLog) -> None:
    """A task with five minutes left at the fork point has five minutes left in the fork, not none."""
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    await eventlog.append("run-r1", [NewEvent.of(RunStarted(run_id="r1", goal="g"))])
    created = TaskCreated(task_id="r1.t1", run_id="r1", title="t", role="cfo", timeout_s=300)
    timer = TimerScheduled(
        timer_id="timeout:r1.t1:1",
        fire_at=an_hour_ago + timedelta(seconds=300),
        target_stream="task-r1.t1",
        payload={"kind": "task_timeout", "timer_id": "timeout:r1.t1:1"},
    )
    started = TaskStarted(task_id="r1.t1", run_id="r1", role="cfo", timer_id="timeout:r1.t1:1")
    res = await eventlog.append("task-r1.t1", [NewEvent.of(created), NewEvent.of(started), NewEvent.of(timer)])
    await eventlog.execute("UPDATE events SET recorded_at = recorded_at - interval '1 hour'")  # it ran an hour ago
    new_run = await fork_run(eventlog, "r1", res.positions[-1])
    (copied,) = [e for e in await eventlog.read_stream(f"task-{new_run}.t1") if e.type == "timer.scheduled"]
    left = datetime.fromisoformat(copied.data["fire_at"]) - datetime.now(UTC)
    assert timedelta(seconds=290) < left <= timedelta(seconds=300)
    assert copied.data["timer_id"] == f"timeout:{new_run}.t1:1"


def test_a_validators_score_that_is_no_finite_number_is_recorded_as_0() -> None:
    """JSON from a model may say NaN; the log refuses NaN, and the attempt must still be recorded."""
    assert [finite(v) for v in (0.8, 1, "0.5", float("nan"), "Infinity", -float("inf"))] == [0.8, 1.0, 0.5, 0, 0, 0]

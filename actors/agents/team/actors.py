"""The team's Ray actors: one per role (``role:<name>``, with its priority queue) and the CEO loop
(``ceo:loop``: run ticks, task timeouts and group decisions)."""

from __future__ import annotations

import asyncio
from typing import Any

import ray
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from actors.agents.team.decision import Decision
from actors.agents.team.queue import TaskQueue
from actors.agents.team.roles import ROLES, VERDICT_SCHEMA, role
from actors.agents.team.run import Run
from actors.agents.team.services import TeamServices
from actors.agents.team.task import CEO_LOOP, TERMINAL, Task
from actors.config import RuntimeConfig
from actors.entity import EntityHost
from actors.llm.actor import complete_via
from actors.llm.providers import Completion, CompletionRequest
from actors.projections import PROJECTOR
from actors.subscriber import EntityActor
from actors.tools import kill_orphans
from events import NewEvent, RecordedEvent, Subscription
from events.team import DecisionVerdict
from storage.errors import StoreUnavailable
from storage.eventlog import START, Cursor

log = structlog.get_logger(__name__)

TASK_TRIGGERS = frozenset({"task.created", "task.assigned", "task.review_requested", "task.reviewed"})
ACTOR_PATH = "actors.agents.team.actors"


class OpenTasks:
    """A fold of the task events a role queue needs: each task's latest trigger, status, role or reviewer,
    priority (raised ones too) and deadline. After a restart it tells a role which tasks to queue again."""

    TYPES = (*TASK_TRIGGERS, "task.priority_raised", *(f"task.{t}" for t in TERMINAL))

    def __init__(self) -> None:
        self.latest: dict[str, tuple[RecordedEvent, dict[str, Any]]] = {}

    def add(self, e: RecordedEvent) -> None:
        d, tid = e.data, e.data["task_id"]
        trigger, st = self.latest.get(tid, (e, {}))
        st = {**st}
        if "priority" in d:
            st["priority"] = d["priority"]
        if d.get("deadline"):
            st["deadline"] = d["deadline"]
        if e.type in ("task.created", "task.assigned"):
            st.update(role=d["role"], status="open")
            trigger = e
        elif e.type == "task.review_requested":
            st.update(status="review", reviewer=d["role"])
            trigger = e
        elif e.type == "task.reviewed":
            st["status"] = "open"
            trigger = e
        elif e.type != "task.priority_raised":  # not a trigger: it only changes the task's place in the queue
            st["status"] = "done"
            trigger = e
        self.latest[tid] = (trigger, st)

    def for_role(self, name: str) -> list[tuple[str, RecordedEvent, int, str | None]]:
        """``(task id, trigger, priority, deadline)`` of every unfinished task ``name`` must act on."""
        return [
            (tid, trigger, int(st.get("priority", 5)), st.get("deadline"))
            for tid, (trigger, st) in self.latest.items()
            if (st.get("status") == "open" and st.get("role") == name)
            or (st.get("status") == "review" and st.get("reviewer") == name)
        ]


# The events of the given task streams, in position order, through the (stream, version) index. Filtered by type
# here as well, the planner (before statistics) combined it with the index on type, which walks every task event.
TASK_STREAMS = "stream = ANY($1::text[])"


def role_subscription(name: str) -> Subscription:
    return Subscription(name=f"role:{name}", types=TASK_TRIGGERS, data_match={"role": name, "owner": name})


LOOP_SUBSCRIPTION = Subscription(
    name=CEO_LOOP,
    types=frozenset({"run.started", "run.forked", "timer.fired", "decision.requested"}),
    categories=frozenset({"run", "task", "decision"}),
)


async def ensure_team(orchestrator: Any) -> None:
    """Register the role actors and the CEO loop with the orchestrator (durable, idempotent)."""
    await asyncio.gather(
        *(orchestrator.register.remote(role_subscription(n), f"{ACTOR_PATH}:RoleActor", [n]) for n in ROLES),
        orchestrator.register.remote(LOOP_SUBSCRIPTION, f"{ACTOR_PATH}:CeoLoopActor", []),
    )


class TeamActor(EntityActor):
    store_retry_wait: Any = wait_exponential(multiplier=0.5, max=8)
    store_retry_stop: Any = stop_after_delay(60)
    step_attempts = 3

    async def setup(self) -> None:
        self.llm = ray.get_actor("llm", namespace=self.config.namespace)
        self.services = TeamServices(self.store, self._complete, self.config.data_dir / "workspaces")

    async def _complete(self, request: CompletionRequest) -> Completion:
        return await complete_via(self.llm, request)

    async def _step(self, host: EntityHost[Any], key: str, trigger: RecordedEvent) -> None:
        """One step of an entity, retried while the store is unavailable (until ``store_retry_stop``), and
        ``step_attempts`` times in all on any other error (reloaded from the log each time: an append whose answer
        was lost may have committed)."""

        def before_retry(state: RetryCallState) -> None:
            host.active.pop(key, None)
            error = state.outcome.exception() if state.outcome else None
            log.warning(
                "step failed; retrying",
                actor=self.subscriber,
                entity=key,
                tries=state.attempt_number,
                error=repr(error),
            )

        def stop(state: RetryCallState) -> bool:
            if state.outcome is not None and isinstance(state.outcome.exception(), StoreUnavailable):
                return bool(self.store_retry_stop(state))
            return state.attempt_number >= self.step_attempts

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=self.store_retry_wait,
            stop=stop,
            reraise=True,
            before_sleep=before_retry,
        )
        async for attempt in retrying:
            with attempt:
                await host.handle(trigger)


class RoleActorImpl(TeamActor):
    """A role: tasks routed to it wait in a priority queue (1 = high first, then deadline, then arrival) and
    are worked one at a time, so a long task never blocks routing.

    A step that meets a store outage is retried (the routed event was already acknowledged: dropping it would
    leave the task waiting for its timeout); if the store is still down after ``store_retry_stop``, the task
    goes back into the queue. A step that raises anything else is tried ``step_attempts`` times in all, then
    its task is failed with the error (``Task.crashed``)."""

    store_retry_pause_s = 1.0

    def __init__(self, config: RuntimeConfig, name: str) -> None:
        self.name = name
        self.queue = TaskQueue()
        self.current: str | None = None
        super().__init__(config, f"role:{name}")

    async def setup(self) -> None:
        # A role started again after a SIGKILL first ends what its predecessor's tests left in the background,
        # instead of leaving that to the next test run on the machine, which may be long in coming.
        await asyncio.to_thread(kill_orphans)
        await super().setup()
        self.hosts["task"] = EntityHost(Task(self.name, self.services), self.store, max_active=200)
        await self._requeue_from_log()
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _requeue_from_log(self) -> None:
        """After a restart, the queue is rebuilt from the log: every unfinished task this role must act on, with
        its priority as last raised and its deadline. Only tasks that may be unfinished are folded: those the
        read model has unfinished as of the projector's checkpoint (both read in one snapshot: the projector
        writes them in one transaction), and those with an event after that checkpoint. Folding every task
        event ever written made each role's start as slow as the team's whole history."""
        async with self.store.connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            cp = await conn.fetchrow("SELECT tx_id, position FROM checkpoints WHERE subscriber = $1", PROJECTOR)
            rows = await conn.fetch("SELECT task_id FROM team_tasks WHERE status <> ALL($1::text[])", list(TERMINAL))
        candidates = {r[0] for r in rows}
        cursor: Cursor = (int(cp[0]), int(cp[1])) if cp else START
        async for batch in self.store.committed_pages(cursor, types=OpenTasks.TYPES):
            candidates.update(e.data["task_id"] for e in batch)
        tasks = OpenTasks()
        streams = [f"task-{tid}" for tid in sorted(candidates)]
        for e in await self.store.read_where(TASK_STREAMS, streams):
            if e.type in OpenTasks.TYPES:
                tasks.add(e)
        for tid, trigger, priority, deadline in tasks.for_role(self.name):
            self.queue.put(tid, trigger, priority, deadline)

    async def handle(self, event: RecordedEvent) -> None:
        self.queue.put(event.data["task_id"], event, int(event.data.get("priority", 5)), event.data.get("deadline"))

    async def _work(self) -> None:
        host = self.hosts["task"]
        while True:
            task_id, trigger = await self.queue.get()
            self.current = task_id
            try:
                await self._step(host, task_id, trigger)
            except StoreUnavailable:
                self.failures += 1
                log.warning("task step waits for the event store", role=self.name, task=task_id)
                host.active.pop(task_id, None)
                await self.handle(trigger)  # back into the queue (a newer trigger that came meanwhile wins)
                await asyncio.sleep(self.store_retry_pause_s)
            except Exception as e:
                self.failures += 1
                log.exception("task step failed; failing the task", role=self.name, task=task_id)
                host.active.pop(task_id, None)  # reload from the log next time
                try:
                    await self._record_crash(trigger, e)
                except StoreUnavailable:
                    log.warning("task step failure not recorded, the store is away: its timeout comes", task=task_id)
            finally:
                self.current = None

    async def verdict(self, decision_id: str, run_id: str, question: str) -> list[dict[str, Any]]:
        """This role's criteria and verdict on a group decision, with the LLM answer behind it."""
        await self._ready
        run = await self.services.run(run_id)
        events, _ = await self.services.ask(
            {},
            f"verdict:{self.name}",
            self.name,
            run,
            role(self.name).verdict_prompt(question),
            VERDICT_SCHEMA,
            recorder=f"decision-{decision_id}",
        )
        v = events[0].data.get("structured") or {}
        verdict = v.get("verdict") if v.get("verdict") in ("approve", "reject", "conditional") else "conditional"
        events.append(
            NewEvent.of(
                DecisionVerdict(
                    decision_id=decision_id,
                    run_id=run_id,
                    role=self.name,
                    criteria=[str(c) for c in v.get("criteria", [])],
                    verdict=verdict,
                    rationale=str(v.get("rationale", "")),
                ),
                actor=f"role:{self.name}",
            )
        )
        return [e.model_dump(mode="json") for e in events]

    async def ping(self) -> dict[str, Any]:
        info = await super().ping()
        return {**info, "role": self.name, "queued": len(self.queue), "current": self.current}


class CeoLoopActorImpl(TeamActor):
    """Run ticks, task timeouts and group decisions. A step is tried ``step_attempts`` times, as a role's is, before
    it is recorded as a crash; a store outage is not retried here: the orchestrator delivers the event again."""

    store_retry_stop: Any = stop_after_attempt(1)

    def __init__(self, config: RuntimeConfig) -> None:
        super().__init__(config, CEO_LOOP)

    async def setup(self) -> None:
        await super().setup()
        self.hosts["run"] = EntityHost(Run(self.services), self.store)
        self.hosts["task"] = EntityHost(Task(CEO_LOOP, self.services), self.store, max_active=200)
        self.hosts["decision"] = EntityHost(Decision(self.services, self._ask_voter), self.store)

    async def _ask_voter(self, voter: str, decision_id: str, run_id: str, question: str) -> list[dict[str, Any]]:
        actor = ray.get_actor(f"role:{voter}", namespace=self.config.namespace)
        return await actor.verdict.remote(decision_id, run_id, question)

    async def handle(self, event: RecordedEvent) -> None:
        host = self.hosts.get(event.category)
        if host is not None:
            await self._step(host, host.entity.key_of(event), event)


RoleActor = ray.remote(num_cpus=0, max_restarts=0)(RoleActorImpl)
CeoLoopActor = ray.remote(num_cpus=0, max_restarts=0)(CeoLoopActorImpl)

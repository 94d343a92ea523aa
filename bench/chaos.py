"""Exactly once under random faults: clients talk to agents and give the team tasks over HTTP while actors die
and Postgres restarts.

A schedule drawn from a seed kills the agents' runners, the team's role actors (QA, the developer and the tech lead
among them, during git commits and pytest runs), the ``llm`` actor, the orchestrator, the projector and the ingress
replica, and stops Postgres and starts it again.

Why: each fault has its own test (tests/test_faults.py, tests/test_outage_database.py), one at a time on a quiet
system. Here they land at random moments under load, one after another, and the whole run is then held to what the
log promises: every message a client was told was recorded is in the log once; every message has exactly one reply,
caused by it, whose turn number shows the agent's chat state lost and repeated nothing; every reply a client got
matches the log; the chat-history and token-usage projections equal what the log says. Every task a client was told
was created is in the log once and is completed, once, with no step recorded twice; each decision asked of the
V-team ends once, with each voter heard once; each TDD task's merge is recorded once and is the one merge commit on
its repository's main; the team's read models and usage equal the log. Clients behave as the API asks: each message,
task and decision carries an ``Idempotency-Key`` and is sent again with it after a 5xx or a dropped connection,
until it is recorded. A soak, not a timing goal: it prints what it did and fails when a promise broke. Run from the
repository root (not while another Ray job is using this machine):

    python -m bench.chaos [--seconds 120] [--seed 1] [--runs 1] [--every 2 4] [--faults runner,...] [--quick]

``--runs 40 --seconds 6 --every 0.7 1.5 --faults runner,orchestrator,projector,database`` is how it found a
message left unanswered after a Postgres restart (README, "Chaos").
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import ray
from git import Repo

from actors.agents.runner import runner_name
from actors.agents.team.actors import ensure_team
from actors.agents.team.history import replay_run, run_events
from actors.agents.team.script import TEAM_SCRIPT
from actors.projections import PROJECTOR
from bench.common import Row, parser, print_table, quiet_logs, running_system
from cluster.bootstrap import APP_NAME
from storage.errors import StoreUnavailable
from storage.eventlog import EventLog

if TYPE_CHECKING:
    from cluster.bootstrap import System

TOKEN = "chaos-token"
FAULTS = ("runner", "role", "llm", "orchestrator", "projector", "ingress", "database")
ROLES = ("cfo", "legal", "product", "risk", "security")  # the team's roles whose tasks need no git workspace
DECISION_EVERY = 20  # tasks per decision asked of the V-team
IMPLEMENT_EVERY = 40  # tasks per TDD task (the scripted model's: tests/test_team.py runs the same one)
IMPLEMENT = {"title": "Implement slugify", "kind": "implement", "description": "slugify(text) in slugify_util.py"}
KILLED_ROLES = (*ROLES, "qa", "developer", "tech_lead")
PER_CHAT = 30  # a chat's messages before its client opens the next: the turn number stays under the history window
RETRYABLE = frozenset({500, 502, 503, 504})


@dataclass
class Sent:
    """One message as its client saw it: what it sent and what the API said in the end."""

    agent_id: str
    chat: str
    turn: int
    text: str
    event_id: str = ""
    outcome: str = ""  # "replied" (200), "accepted" (202), "failed" (the agent's own failure, 502)
    response: str = ""
    tries: int = 0


@dataclass
class Run:
    """What a run did, and every broken promise found after it."""

    agents: list[str]
    sent: list[Sent] = field(default_factory=list)
    team_run: str = ""
    tasks: dict[str, str] = field(default_factory=dict)  # each created task's title -> its id, as the API said
    decisions: list[str] = field(default_factory=list)  # the decisions asked for, as the API named them
    implements: dict[str, str] = field(default_factory=dict)  # TDD runs: run id -> its task's id
    faults: Counter[str] = field(default_factory=Counter)
    missed: Counter[str] = field(default_factory=Counter)  # drawn while its target was still being restarted
    longest_wait_s: float = 0.0  # the longest any one message or create took to be recorded, retries included
    longest_wait: str = ""  # that request and its tries: what to look at in the faults' lines and the logs
    creates_again: int = 0  # task and decision creates sent again
    settle_s: float = 0.0
    violations: list[str] = field(default_factory=list)

    def rows(self) -> list[Row]:
        outcomes = Counter(s.outcome for s in self.sent)
        return [
            Row("messages recorded", str(len(self.sent))),
            Row("  answered at once (200)", str(outcomes["replied"])),
            Row("  recorded, reply later (202)", str(outcomes["accepted"])),
            Row("  failed by the agent (502)", str(outcomes["failed"])),
            Row("team tasks created", str(len(self.tasks))),
            Row("V-team decisions asked", str(len(self.decisions))),
            Row("TDD tasks (each in a git repository of its own)", str(len(self.implements))),
            Row("messages sent again (5xx, dropped)", str(sum(s.tries - 1 for s in self.sent))),
            Row("task and decision creates sent again", str(self.creates_again)),
            Row("longest wait to be recorded", f"{self.longest_wait_s:.1f} s"),
            *(Row(f"fault: {kind}", f"{self.faults[kind]} ({self.missed[kind]} missed)") for kind in FAULTS),
            Row("settled and checked after the load", f"{self.settle_s:.1f} s"),
            Row("broken promises", str(len(self.violations)), "0", "ok" if not self.violations else "FAILED"),
        ]


def replica_names() -> list[str]:
    """The ingress replicas' actor names (Serve's replica ids, ``ReplicaID.to_full_id_str``), in namespace "serve"."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#api#"
    return [a["name"] for a in ray.util.list_named_actors(True) if a["name"].startswith(prefix)]


def step_of(e: Any) -> object:
    """What tells apart the events of one type that one handling of a task records (the developer's attempts are
    one handling: each writes its own files)."""
    if e.type == "task.attempted":
        return e.data["attempt"]
    if e.type == "task.files_written":
        return e.data["role"], tuple(sorted(e.data["files"].items()))
    return e.data.get("request_hash")


def expected_reply(s: Sent) -> str:
    """The scripted provider's answer (actors/llm/scripted.py) ends with the turn: the chat's user messages."""
    return f"turn {s.turn}: you said {s.text!r}"


# How ``Chaos.check`` begins a problem when it could not look at the system (``settled`` tells progress by them)
NOT_ANSWERING, UNHEALTHY = "not answering yet:", "/healthz:"
UNREACHED = (NOT_ANSWERING, UNHEALTHY)


class Chaos:
    def __init__(
        self,
        system: System,
        http: httpx.AsyncClient,
        seed: int,
        kinds: Sequence[str] = FAULTS,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.system = system
        self.http = http
        self.rng = random.Random(seed)
        self.kinds = tuple(kinds)
        self.tag = f"s{seed}"  # in chat ids and texts: runs on the same agents keep apart
        self.ns = system.settings.ray_namespace
        self.run: Run = Run(agents=[])
        self.started = time.monotonic()
        self.until = math.inf  # the load's end (``chaos`` sets it), and what it must have recorded by then
        self.at_least = (0, 0)
        self.say = say  # a live line per fault

    @property
    def loading(self) -> bool:
        """Until the time is up, and on until ``at_least`` messages and team tasks were recorded (a slow machine
        gets a longer run, not a lighter one), unless a promise was broken: a client stopped there."""
        if time.monotonic() < self.until:
            return True
        short = len(self.run.sent) < self.at_least[0] or len(self.run.tasks) < self.at_least[1]
        return short and not self.run.violations

    async def create_agents(self, n: int) -> None:
        for _ in range(n):
            r = await self.http.post("/api/v1/agents", json={"name": "chaos agent", "settings": {}})
            r.raise_for_status()
            agent_id = r.json()["id"]
            (await self.http.post(f"/api/v1/agents/{agent_id}/start")).raise_for_status()
            self.run.agents.append(agent_id)

    # ---- clients ----

    async def client(self, i: int) -> None:
        """One chat at a time, each message sent until it is recorded; the next once the last was."""
        agent_id = self.run.agents[i % len(self.run.agents)]
        k = 0
        while self.loading:
            chat, text = f"{self.tag}c{i}-{k // PER_CHAT}", f"{self.tag} client {i} message {k}"
            s = Sent(agent_id=agent_id, chat=chat, turn=k % PER_CHAT + 1, text=text)
            if not await self.send(agent_id, s, key=f"{self.tag}-{i}-{k}"):
                return
            self.run.sent.append(s)
            k += 1

    async def send(self, agent_id: str, s: Sent, key: str) -> bool:
        body = {"text": s.text, "chat_id": s.chat}
        r, s.tries = await self.post(f"/api/v1/agents/{agent_id}/messages", body, key, timeout=5)
        if r.status_code == 200:
            answer = r.json()
            s.event_id, s.outcome, s.response = answer["event_id"], "replied", answer["response"]
        elif r.status_code == 202:
            s.event_id, s.outcome = r.json()["event_id"], "accepted"
        elif r.status_code == 502:
            s.outcome = "failed"
        else:
            self.run.violations.append(f"{s.text}: answered {r.status_code} {r.text[:200]}")
            return False
        return True

    async def post(self, path: str, body: dict[str, Any], key: str, **params: Any) -> tuple[httpx.Response, int]:
        """POST with ``key`` until the answer is neither a 5xx nor a dropped connection (a 502 that the agent failed
        to reply is an answer); returns it and the number of tries."""
        started, tries, outcomes = time.monotonic(), 0, []
        while True:
            tries += 1
            try:
                r = await self.http.post(path, json=body, headers={"Idempotency-Key": key}, params=params)
            except httpx.TransportError as e:  # the replica died under the request, or HAProxy dropped it
                outcomes.append(f"{type(e).__name__} at {time.monotonic() - self.started:.1f} s")
                await asyncio.sleep(0.2)
                continue
            outcomes.append(f"{r.status_code} at {time.monotonic() - self.started:.1f} s")
            detail = r.json().get("detail", "") if r.headers.get("content-type") == "application/json" else ""
            if r.status_code in RETRYABLE and not str(detail).startswith("agent failed to reply"):
                await asyncio.sleep(0.2)
                continue
            if (waited := time.monotonic() - started) > self.run.longest_wait_s:
                self.run.longest_wait_s = waited
                shown = outcomes if len(outcomes) <= 6 else [*outcomes[:3], "...", *outcomes[-3:]]
                self.run.longest_wait = (
                    f"POST {path} sent at {started - self.started:.1f} s, {tries} tries: {', '.join(shown)}"
                )
            return r, tries

    async def start_team(self) -> None:
        """The team's roles registered, its scripted model set, and a run of this seed to give tasks to."""
        await ensure_team(self.system.orchestrator)
        await ray.get_actor("llm", namespace=self.ns).set_script.remote("team", TEAM_SCRIPT)
        body = {"goal": f"chaos {self.tag}", "provider": "scripted:team", "max_generated_tasks": 0}
        r, _ = await self.post("/api/v1/runs", body, f"{self.tag}-run")
        r.raise_for_status()
        self.run.team_run = r.json()["run_id"]

    async def create(self, path: str, body: dict[str, Any], key: str, expect: int = 201) -> dict[str, Any] | None:
        """A create sent until recorded; its answer, or None (and a broken promise) when it was refused."""
        r, tries = await self.post(path, body, key)
        self.run.creates_again += tries - 1
        if r.status_code != expect:
            self.run.violations.append(f"POST {path} {body}: answered {r.status_code} {r.text[:200]}")
            return None
        answer: dict[str, Any] = r.json()
        return answer

    async def team_client(self) -> None:
        """Tasks for the team's roles, one after another, each sent until it is created; now and then a decision
        for the V-team, and a TDD task in a run of its own."""
        k = 0
        while self.loading:
            title = f"{self.tag} task {k}"
            body = {"title": title, "role": ROLES[k % len(ROLES)]}
            if not (task := await self.create(f"/api/v1/runs/{self.run.team_run}/tasks", body, f"{self.tag}-task-{k}")):
                return
            self.run.tasks[title] = task["task_id"]
            if k % DECISION_EVERY == 0:  # its voters are killed too
                question = {"question": f"{self.tag} decision {k // DECISION_EVERY}?"}
                path, key = f"/api/v1/runs/{self.run.team_run}/decisions", f"{self.tag}-decision-{k}"
                if not (decision := await self.create(path, question, key, expect=202)):
                    return
                self.run.decisions.append(decision["decision_id"])
            if k % IMPLEMENT_EVERY == IMPLEMENT_EVERY // 2 and not await self.implement(k):
                return
            k += 1
            await asyncio.sleep(0.05)

    async def implement(self, k: int) -> bool:
        """QA writes tests, the developer makes them pass, the tech lead merges: git commits and pytest runs, side
        effects outside the log. In a run of its own, since each run has its own repository and the scripted model
        writes the same files every time."""
        body = {"goal": f"chaos {self.tag} implement {k}", "provider": "scripted:team", "max_generated_tasks": 0}
        if not (run := await self.create("/api/v1/runs", body, f"{self.tag}-implement-run-{k}")):
            return False
        path, key = f"/api/v1/runs/{run['run_id']}/tasks", f"{self.tag}-implement-{k}"
        if not (task := await self.create(path, IMPLEMENT, key)):
            return False
        self.run.implements[run["run_id"]] = task["task_id"]
        return True

    # ---- faults ----

    async def faults(self, every: tuple[float, float]) -> None:
        """Kinds are dealt from a shuffled deck, dealt again when empty: every kind lands within any run of
        ``len(kinds)`` faults, where independent draws left some out of a short run."""
        deck: list[str] = []
        while self.loading:
            await asyncio.sleep(self.rng.uniform(*every))
            if self.loading:
                if not deck:
                    deck = list(self.kinds)
                    self.rng.shuffle(deck)
                kind = deck.pop()
                hit = await self.inject(kind)
                (self.run.faults if hit else self.run.missed)[kind] += 1
                if self.say is not None:
                    at = time.monotonic() - self.started
                    what = f"{kind} ({hit})" if hit else f"{kind} (not there: still restarting)"
                    self.say(f"[{at:6.1f} s] {len(self.run.sent):6d} recorded, fault: {what}")

    async def inject(self, kind: str) -> str:
        """One fault; what it hit (an actor's name, or the database), or "" when its target was not there to hit
        (an actor still being restarted)."""
        if kind == "database":
            assert self.system.embedded is not None, "the database fault needs the embedded Postgres"
            await asyncio.to_thread(self.system.embedded.stop)
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
            await asyncio.to_thread(self.system.embedded.start)
            return "database"
        namespace, restart = self.ns, False
        if kind == "runner":
            name = runner_name(self.rng.choice(self.run.agents))
        elif kind == "role":  # the orchestrator starts it again
            name = f"role:{self.rng.choice(KILLED_ROLES)}"
        elif kind == "llm":
            name, restart = "llm", True  # Ray restarts it, with its scripts; a call in flight is retried there
        elif kind == "orchestrator":
            name, restart = "orchestrator", True  # Ray restarts it; it restarts the others
        elif kind == "projector":
            name = PROJECTOR
        else:  # Serve replaces its replica
            name, namespace = next(iter(await asyncio.to_thread(replica_names)), ""), "serve"
        try:
            handle = await asyncio.to_thread(ray.get_actor, name, namespace=namespace)
        except ValueError:
            return ""
        ray.kill(handle, no_restart=not restart)
        return name

    # ---- the promises ----

    async def settle(self, timeout: float) -> None:
        """Wait until every recorded message has its reply and the projections have caught up, then check."""
        started = time.monotonic()
        self.run.violations += await settled(self.check, timeout)
        self.run.settle_s = time.monotonic() - started

    async def check(self) -> list[str]:
        try:
            health = await self.http.get("/healthz")
            if health.status_code != 200:
                return [f"{UNHEALTHY} {health.status_code} {health.text[:300]}"]
            log = await EventLog.connect(self.system.database_url, run_migrations=False)
            try:
                problems = [p for agent_id in self.run.agents for p in await self.check_agent(log, agent_id)]
                return problems + (await self.check_team(log) if self.run.team_run else [])
            finally:
                await log.close()
        except (httpx.TransportError, StoreUnavailable, ValueError) as e:  # still recovering (ValueError: not JSON)
            return [f"{NOT_ANSWERING} {e!r}"]

    async def check_agent(self, log: EventLog, agent_id: str) -> list[str]:
        sent = {s.text: s for s in self.run.sent if s.agent_id == agent_id}
        every = await log.read_where("stream LIKE $1", f"chat-{agent_id}/%")  # usage counts earlier runs' too
        events = [e for e in every if e.stream.startswith(f"chat-{agent_id}/{self.tag}c")]
        messages = [e for e in events if e.type == "chat.message_received"]
        by_text = Counter(e.data["text"] for e in messages)
        problems = [f"{t!r} recorded {n} times" for t, n in by_text.items() if n > 1]
        problems += [f"{t!r} in the log, never sent" for t in by_text if t not in sent]
        problems += [f"{t!r} acknowledged, not in the log" for t in sent if t not in by_text]
        replies: dict[str, list[Any]] = {}
        for e in events:
            if e.type in ("chat.reply_sent", "chat.reply_failed"):
                replies.setdefault(str(e.meta.causation_id), []).append(e)
        for m in messages:
            s, answers = sent.get(m.data["text"]), replies.get(str(m.id), [])
            if len(answers) != 1:
                problems.append(f"{m.data['text']!r}: {len(answers)} replies")
                continue
            reply = answers[0]
            if s is None:
                continue
            if s.event_id and s.event_id != str(m.id):
                problems.append(f"{s.text!r}: acknowledged as {s.event_id}, recorded as {m.id}")
            if reply.type == "chat.reply_sent":
                if not reply.data["response"].endswith(expected_reply(s)):
                    problems.append(f"{s.text!r}: replied {reply.data['response']!r}, not turn {s.turn}")
                if s.outcome == "replied" and s.response != reply.data["response"]:
                    problems.append(f"{s.text!r}: the client got {s.response!r}, the log has another reply")
            elif s.outcome == "replied":
                problems.append(f"{s.text!r}: the client got a reply, the log has a failure")
        return problems + await self.check_projections(agent_id, events, every)

    async def check_projections(self, agent_id: str, events: list[Any], every: list[Any]) -> list[str]:
        problems = []
        for chat in sorted({e.data["chat_id"] for e in events if e.type == "chat.message_received"}):
            expected = [
                ("user", e.data["text"]) if e.type == "chat.message_received" else ("assistant", e.data["response"])
                for e in events
                if e.data.get("chat_id") == chat and e.type in ("chat.message_received", "chat.reply_sent")
            ]
            r = await self.http.get(f"/api/v1/agents/{agent_id}/chats/{chat}/messages", params={"limit": 1000})
            if [(m["role"], m["text"]) for m in r.json()] != expected:
                problems.append(f"chat {chat}: the history projection differs from the log")
        completions = [e.data for e in every if e.type == "llm.completed"]
        usage = (await self.http.get(f"/api/v1/agents/{agent_id}/usage")).json()
        calls = sum(m["calls"] for m in usage["models"])
        if calls != len(completions) or usage["total_tokens"] != sum(c["total_tokens"] for c in completions):
            problems.append(
                f"agent {agent_id}: usage {calls} calls, {usage['total_tokens']} tokens; the log "
                f"{len(completions)} completions, {sum(c['total_tokens'] for c in completions)} tokens"
            )
        status = (await self.http.get(f"/api/v1/agents/{agent_id}")).json()["status"]
        if status != "running":
            problems.append(f"agent {agent_id} is {status}")
        return problems

    async def check_team(self, log: EventLog) -> list[str]:
        """The run the tasks went to, with its decisions (below), then each TDD run and its repository."""
        events, problems = await self.check_run(log, self.run.team_run, self.run.tasks)
        problems += self.check_decisions(events)
        for run_id, task_id in self.run.implements.items():
            events, more = await self.check_run(log, run_id, {IMPLEMENT["title"]: task_id})
            problems += more + self.check_merge(run_id, events)
        return problems

    async def check_run(self, log: EventLog, run_id: str, acked: dict[str, str]) -> tuple[list[Any], list[str]]:
        """Each task created (``acked``: title -> the id the API answered) once in the log, under that id, and
        completed once, no step recorded twice; the read models and usage as the log says. Returns the run's
        events and the problems."""
        events = await run_events(log, run_id)
        tasks: dict[str, list[Any]] = {}
        for e in events:
            if e.category == "task":
                tasks.setdefault(e.stream_id, []).append(e)
        created = Counter(e.data["title"] for e in events if e.type == "task.created")
        problems = [f"run {run_id}: task {t!r} created {n} times" for t, n in created.items() if n > 1]
        problems += [f"run {run_id}: task {t!r} acknowledged, not in the log" for t in acked if t not in created]
        logged = {e.data["title"]: e.data["task_id"] for e in events if e.type == "task.created"}
        problems += [
            f"task {t!r}: created as {i}, logged as {logged[t]}" for t, i in acked.items() if logged.get(t, i) != i
        ]
        for task_id, steps in tasks.items():
            ends = [e for e in steps if e.type in ("task.completed", "task.failed", "task.cancelled")]
            if [e.type for e in ends] != ["task.completed"]:
                why = [e.data.get("reason") or e.data.get("result") for e in ends]
                problems.append(f"task {task_id}: ends {[e.type for e in ends]} {why}")
            # One handling may record several completions and attempts; the same one twice is a step repeated.
            twice = Counter((e.type, e.meta.causation_id, step_of(e)) for e in steps)
            if repeated := [f"{t} {k} recorded {n} times" for (t, _, k), n in twice.items() if n > 1]:
                # what each attempt said of itself: a repeat after a failed attempt names why it failed
                tried = [
                    (e.data["attempt"], e.data["valid"], e.data["issues"][:2])
                    for e in steps
                    if e.type == "task.attempted"
                ]
                problems += [f"task {task_id}: {r}; attempts (number, valid, issues): {tried}" for r in repeated]
        replay = await replay_run(log, run_id)
        problems += [f"run {run_id}: {m}" for m in replay.mismatches]
        counts = (await self.http.get(f"/api/v1/runs/{run_id}")).json()["tasks"]
        if counts != {"completed": len(tasks)}:
            problems.append(f"run {run_id}: the read model counts {counts}, the log {len(tasks)} tasks")
        completions = [e.data for e in events if e.type == "llm.completed"]
        usage = (await self.http.get(f"/api/v1/runs/{run_id}/usage")).json()
        tokens = sum(c["prompt_tokens"] + c["completion_tokens"] for c in completions)
        if (usage["calls"], usage["tokens"]) != (len(completions), tokens):
            problems.append(
                f"run {run_id}: usage {usage['calls']} calls, {usage['tokens']} tokens; the log "
                f"{len(completions)} completions, {tokens} tokens"
            )
        return events, problems

    def check_merge(self, run_id: str, events: list[Any]) -> list[str]:
        """The side effect matches the log: one merge recorded, and the run's repository has that one merge on
        main, at its head."""
        merged = [e.data["commit"] for e in events if e.type == "task.merged"]
        repo = Repo(self.system.settings.data_dir.resolve() / "workspaces" / run_id)
        merges = [c.hexsha for c in repo.iter_commits("main") if len(c.parents) > 1]
        if len(merged) != 1 or merges != merged:
            return [f"run {run_id}: merges recorded {merged}, merge commits on main {merges}"]
        return []

    def check_decisions(self, events: list[Any]) -> list[str]:
        """Each decision asked for ends once; each voter is heard once (a verdict, or a failure when its actor was
        killed under the call: the CEO then decides without it), and the decision's votes are the verdicts."""
        problems = []
        for decision_id in self.run.decisions:
            steps = [e for e in events if e.stream == f"decision-{decision_id}"]
            ends = [e for e in steps if e.type in ("decision.made", "decision.failed")]
            heard = Counter(e.data["role"] for e in steps if e.type in ("decision.verdict", "decision.voter_failed"))
            asked = [e.data["voters"] for e in steps if e.type == "decision.requested"]
            if len(ends) != 1 or len(asked) != 1:
                problems.append(f"decision {decision_id}: asked {len(asked)} times, ends {[e.type for e in ends]}")
                continue
            if heard != Counter(asked[0]):
                problems.append(f"decision {decision_id}: voters {asked[0]}, heard {dict(heard)}")
            verdicts = {e.data["role"]: e.data["verdict"] for e in steps if e.type == "decision.verdict"}
            if ends[0].type == "decision.made" and ends[0].data["votes"] != verdicts:
                problems.append(f"decision {decision_id}: votes {ends[0].data['votes']}, verdicts {verdicts}")
        return problems


async def chaos(
    system: System,
    *,
    seconds: float,
    seed: int,
    clients: int = 6,
    agents: int | list[str] = 2,
    every: tuple[float, float] = (2.0, 4.0),
    kinds: Sequence[str] = FAULTS,
    settle_timeout: float = 120.0,
    say: Callable[[str], None] | None = None,
    at_least: tuple[int, int] = (0, 0),
) -> Run:
    """Load for ``seconds`` (and on until ``at_least`` messages and team tasks were recorded) with faults on a
    schedule drawn from ``seed``; then let it settle and check."""
    headers = {"Authorization": f"Bearer {system.api_token}"}
    async with httpx.AsyncClient(base_url=system.api_url, headers=headers, timeout=60) as http:
        c = Chaos(system, http, seed, kinds, say)
        if isinstance(agents, list):  # an earlier run's (``--runs``): its chats and keys carry another seed
            c.run.agents = agents
        else:
            await c.create_agents(agents)
        await c.start_team()
        c.until, c.at_least = time.monotonic() + seconds, at_least
        load = [asyncio.create_task(c.client(i)) for i in range(clients)]
        load.append(asyncio.create_task(c.team_client()))
        injector = asyncio.create_task(c.faults(every))
        await asyncio.gather(injector, *load)  # each client finishes the message it was sending
        await c.settle(settle_timeout)
        return c.run


async def settled(check: Callable[[], Awaitable[list[str]]], timeout: float, recheck_s: float = 0.5) -> list[str]:
    """The problems ``check`` still finds once none are left or ``timeout`` seconds passed with no progress (no
    fewer problems than the fewest yet, among checks that reached the system). A backlog that drains slowly (TDD
    tasks take two pytest runs each) is waited out instead of reported as broken; a system that stopped making
    progress is still reported after ``timeout``."""
    deadline, fewest = time.monotonic() + timeout, math.inf
    while True:
        problems = await check()
        reached = not any(p.startswith(UNREACHED) for p in problems)
        if reached and len(problems) < fewest:
            deadline, fewest = time.monotonic() + timeout, len(problems)
        if not problems or time.monotonic() > deadline:
            return problems
        await asyncio.sleep(recheck_s)


def combined(runs: list[Run]) -> Run:
    """Several runs on one system as one, for the table."""
    total = Run(agents=runs[0].agents)
    for r in runs:
        total.sent += r.sent
        total.tasks.update(r.tasks)
        total.decisions += r.decisions
        total.implements.update(r.implements)
        total.creates_again += r.creates_again
        total.faults.update(r.faults)
        total.missed.update(r.missed)
        if r.longest_wait_s > total.longest_wait_s:
            total.longest_wait_s, total.longest_wait = r.longest_wait_s, r.longest_wait
        total.settle_s = max(total.settle_s, r.settle_s)
        total.violations += r.violations
    return total


async def soak(system: System, args: argparse.Namespace) -> list[Run]:
    """``--runs`` runs in a row on the same agents, each checked once settled: a message left behind shows at
    the end of a run, where the next messages cannot carry it along."""
    runs: list[Run] = []
    agents: int | list[str] = 2
    seconds = 20.0 if args.quick else args.seconds
    every = (args.every[0], args.every[1])
    for i in range(args.runs):
        run = await chaos(
            system,
            seconds=seconds,
            seed=args.seed + i,
            agents=agents,
            every=every,
            kinds=args.faults,
            say=print if args.runs == 1 else None,
        )
        agents = run.agents
        runs.append(run)
        if args.runs > 1:
            print(
                f"run {i + 1}/{args.runs} (seed {args.seed + i}): {len(run.sent)} messages, faults "
                f"{dict(run.faults)}, longest wait {run.longest_wait_s:.1f} s, broken promises {len(run.violations)}",
                flush=True,
            )
        if run.violations:
            break
    return runs


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seconds", type=float, default=120.0, help="how long the load and the faults last, per run")
    p.add_argument("--seed", type=int, default=1, help="draws the faults' kinds and moments (run i: seed + i)")
    p.add_argument("--runs", type=int, default=1, help="runs in a row on one system, each checked once settled")
    p.add_argument(
        "--every",
        type=float,
        nargs=2,
        default=[2.0, 4.0],
        metavar=("MIN", "MAX"),
        help="seconds between faults, drawn between these",
    )
    p.add_argument(
        "--faults",
        type=lambda v: v.split(","),
        default=list(FAULTS),
        help=f"kinds of fault, comma-separated, of {','.join(FAULTS)}",
    )
    args = p.parse_args()
    if unknown := set(args.faults) - set(FAULTS):
        p.error(f"unknown faults: {', '.join(sorted(unknown))}")
    quiet_logs()
    with running_system(TOKEN) as (system, _):
        run = combined(asyncio.run(soak(system, args)))
    print_table(f"exactly once under random faults (seed {args.seed}, {args.runs} run(s))", run.rows())
    print(f"  the longest wait (times from its run's start): {run.longest_wait}")
    for v in run.violations:
        print("  broken:", v)
    if run.violations:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

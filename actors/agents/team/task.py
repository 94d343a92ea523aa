"""A task (stream ``task-<id>``): created, started, attempted and self-validated, reviewed by a peer, completed.

One class serves every role: the role actor hosting it decides only for tasks assigned to it (or to review),
and the CEO loop decides only about timeouts. Every LLM answer is recorded (``llm.completed``) before it is
used, so a restarted actor resumes a task where the log says it is, without asking again."""

from __future__ import annotations

import asyncio
import math
import posixpath
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from actors.agents.team.roles import FILES_SCHEMA, REVIEW_SCHEMA, VALIDATION_SCHEMA, role
from actors.agents.team.services import (
    CRASH_REASON_CHARS,
    PAID,
    Completed,
    RunConfig,
    TeamServices,
    crash_reason,
    relative,
)
from actors.entity import Context, Entity, Spawn
from actors.llm.base import ProviderError
from actors.llm.budget import BudgetExceededError, paid_without_text
from actors.tools import GitWorkspace, WorkspaceError, run_pytest
from actors.tools.git_workspace import MAIN, AlreadyMergedError, ApprovalRequiredError, MergeConflictError
from events import NewEvent, RecordedEvent
from events.system import TimerScheduled
from events.team import (
    BudgetExceeded,
    Deadline,
    FilesWritten,
    MemoryNoted,
    ReviewRequested,
    TaskAssigned,
    TaskAttempted,
    TaskCompleted,
    TaskEscalated,
    TaskFailed,
    TaskMerged,
    TaskPriorityRaised,
    TaskReviewed,
    TaskStarted,
    TaskTimedOut,
)
from storage.errors import StoreError

TERMINAL = frozenset({"completed", "failed", "cancelled"})
ATTEMPTS_PER_APPROACH = 3
APPROACHES = 2
PASS_SCORE = 7.0
CEO_LOOP = "ceo:loop"
# What an answer itself causes in the file and git tools (a path outside the tree or in .git, a file too large or
# not text, a file where its directory should be, no files mapping at all) or a merge the branch cannot make (a
# conflict with main): recorded as the step's outcome. Dropped, they left the task to its timeout, and the
# escalated-to role reused the same recorded answer. A failure of the machine (a full disk, a lock git left, too
# many open files) is no outcome of the task: it propagates, and the step is tried again.
WORKSPACE_ERRORS = (
    WorkspaceError,
    MergeConflictError,
    ApprovalRequiredError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    ValueError,
)
# Files that decide how pytest runs QA's tests (conftest.py at any depth too): never the developer's to write.
PYTEST_CONFIG = frozenset(
    {"pytest.toml", ".pytest.toml", "pytest.ini", ".pytest.ini", "pyproject.toml", "setup.cfg", "tox.ini"}
)
# Top-level names that ``python -m pytest``, run in the tree (the tree first on sys.path), would import instead of
# pytest and its own packages: a ``pytest.py`` there runs in pytest's place and writes whatever report it likes.
PYTEST_SHADOWS = frozenset({"pytest", "_pytest", "py", "pluggy", "iniconfig", "packaging", "pygments"})


class Attempt(BaseModel):
    attempt: int
    approach: int
    output: str
    valid: bool
    score: float
    issues: list[str] = Field(default_factory=list)


class TaskState(BaseModel):
    task_id: str = ""
    run_id: str = ""
    title: str = ""
    description: str = ""
    kind: str = "generic"
    role: str = ""
    owner: str = ""
    priority: int = 5
    deadline: Deadline | None = None  # UTC, also when an older event recorded it without a time zone
    timeout_s: float = 300.0
    spec: dict[str, Any] = Field(default_factory=dict)
    status: str = "absent"
    phase: str = "work"
    starts: int = 0
    timer_id: str | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    completions: dict[str, Completed] = Field(default_factory=dict)
    tests: dict[str, str] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    branch: str | None = None
    reviewer: str | None = None
    reviews: int = 0
    reviewed_attempt: int = 0
    approved_by: str | None = None
    feedback: list[str] = Field(default_factory=list)
    merged: str | None = None
    result: str | None = None

    def acting(self) -> str | None:
        """The role whose turn it is: the reviewer during a review, else the task's role."""
        return self.reviewer if self.status == "review" else self.role

    def ids(self) -> dict[str, str]:
        return {"task_id": self.task_id, "run_id": self.run_id}


def evolve_task(s: TaskState, e: RecordedEvent) -> TaskState:
    d, t = e.data, e.type
    if t == "task.created":
        s = TaskState(status="pending", owner=d["role"], **{k: v for k, v in d.items() if k in TaskState.model_fields})
        s.phase = "tests" if s.kind == "implement" else "work"
    elif t == "task.assigned":
        # Handed on: the previous role's timeout timer is void (the new role's start arms its own), and its
        # answers are none of the new role's (purposes are per attempt, not per role: the tech lead would reuse the
        # developer's code for the attempt the developer had not finished, and ask its own prompt nothing).
        s.role, s.phase, s.status, s.timer_id, s.completions = d["role"], d["phase"], "pending", None, {}
    elif t == "task.started":
        s.status, s.timer_id, s.starts = "in_progress", d["timer_id"], s.starts + 1
    elif t == "task.priority_raised":
        s.priority = d["priority"]
    elif t == "llm.completed" and d.get("purpose") and d.get("agent_id") == s.acting():
        # An answer a role asked for before the task was handed on (recorded late: it was paid for) is no answer
        # for the role that has it now, which asks for its own.
        s.completions[d["purpose"]] = Completed(text=d["text"], structured=d.get("structured"))
    elif t == "task.files_written":
        s.branch = d["branch"]
        # Tests are what the tests phase writes: QA's, or the tech lead's when the task was escalated to it.
        (s.tests if d["role"] == "qa" or s.phase == "tests" else s.files).update(d["files"])
    elif t == "task.attempted":
        s.attempts.append(Attempt.model_validate(d))
    elif t == "task.review_requested":
        s.status, s.reviewer = "review", d["role"]
    elif t == "task.reviewed":
        s.reviews += 1
        s.reviewed_attempt = len(s.attempts)
        s.status = "in_progress"
        if d["approved"]:
            s.approved_by = d["role"]
        else:
            s.feedback.append(f"review by {d['role']}: {d['comments']}")
    elif t == "task.merged":
        s.merged = d["commit"]
    elif t == "task.completed":
        s.status, s.result = "completed", d["result"]
    elif t == "task.failed":
        s.status, s.result = "failed", d["reason"]
    elif t == "task.cancelled":
        s.status = "cancelled"
    elif t == "task.timed_out":
        s.timer_id = None
    return s


class Task(Entity[TaskState]):
    category = "task"
    conflict_keeps = PAID
    max_steps = 64

    def __init__(self, me: str, services: TeamServices) -> None:
        self.me = me
        self.services = services

    def initial(self) -> TaskState:
        return TaskState()

    @staticmethod
    def recorder(s: TaskState) -> str:
        return f"task-{s.task_id}"

    def evolve(self, state: TaskState, event: RecordedEvent) -> TaskState:
        return evolve_task(state, event)

    async def decide(self, s: TaskState, message: RecordedEvent, ctx: Context) -> list[NewEvent | Spawn]:
        if s.status in TERMINAL or s.status == "absent":
            return []
        if self.me == CEO_LOOP:
            return self.on_timeout(s, message)
        run = await self.services.run(s.run_id)
        try:
            if s.status == "review":
                return await self.review(s, run) if s.reviewer == self.me else []
            if s.role != self.me:
                return []
            if s.status == "pending":
                return self.start(s)
            if s.approved_by and s.reviewed_attempt == len(s.attempts):
                return await self.finish(s, run)
            if s.kind == "implement":
                return await (self.write_tests(s, run) if s.phase == "tests" else self.code(s, run))
            return await self.work(s, run)
        except BudgetExceededError as e:
            run_event = NewEvent.of(BudgetExceeded(run_id=s.run_id, spent_usd=e.spent, budget_usd=e.budget))
            return [
                NewEvent.of(TaskFailed(**s.ids(), role=self.me, reason=str(e))),
                Spawn(f"run-{s.run_id}", [run_event]),
            ]
        except ProviderError as e:  # retries and any fallback are spent: say so now, not at the timeout
            return [NewEvent.of(TaskFailed(**s.ids(), role=self.me, reason=f"LLM call failed: {e}"))]

    def crashed(
        self, s: TaskState, message: RecordedEvent, ctx: Context, error: Exception, decided: list[NewEvent]
    ) -> list[NewEvent]:
        """A step that kept failing on something no answer caused (a bug, the machine) fails its task now, the
        error in the reason, instead of leaving the task to its timeout and the next role to meet the same. The
        completions its last decision paid for are kept (without their text), as a refusal keeps them."""
        if s.status == "absent":
            return []
        paid = paid_without_text(decided)
        if s.status in TERMINAL or self.me not in (s.acting(), CEO_LOOP):
            return paid  # handed on meanwhile (escalated at its timeout): the task is another role's now
        reason = crash_reason(f"step failed at {self.me}", error, self.services.workspaces)
        return [*paid, NewEvent.of(TaskFailed(**s.ids(), role=self.me, reason=reason))]

    def refused(
        self, s: TaskState, message: RecordedEvent, error: StoreError, decided: list[NewEvent]
    ) -> list[NewEvent]:
        """A step's result the log cannot hold (an answer over the size limit, a NUL character) fails the task at
        once with the reason, its completion kept without the text (it was paid for). It used to be tried again
        three times, the same cached answer each time, then recorded as a crash, its cost never."""
        why = f"the step's result could not be recorded: {error}"[:CRASH_REASON_CHARS]
        return [*paid_without_text(decided), NewEvent.of(TaskFailed(**s.ids(), role=self.me, reason=why))]

    def told(self, error: Exception, run: RunConfig) -> str:
        """An error as the log and the model are told it: paths relative to the run's workspace (an OS error names
        the file by its absolute path, which is the service's own layout)."""
        return relative(str(error), self.services.workspace_dir(run))

    # ---- steps -------------------------------------------------------------------------------------------

    def start(self, s: TaskState) -> list[NewEvent | Spawn]:
        out: list[NewEvent | Spawn] = []
        now = datetime.now(UTC)
        if s.deadline and s.priority > 1 and s.deadline - now < timedelta(seconds=2 * s.timeout_s):
            out.append(NewEvent.of(TaskPriorityRaised(**s.ids(), priority=1, reason="deadline is near")))
        timer_id = f"timeout:{s.task_id}:{s.starts + 1}"
        fire_at = now + timedelta(seconds=s.timeout_s)
        out.append(NewEvent.of(TaskStarted(**s.ids(), role=self.me, timer_id=timer_id)))
        out.append(
            NewEvent.of(
                TimerScheduled(
                    timer_id=timer_id,
                    fire_at=fire_at,
                    target_stream=f"task-{s.task_id}",
                    payload={"kind": "task_timeout", "timer_id": timer_id},
                )
            )
        )
        return out

    def on_timeout(self, s: TaskState, message: RecordedEvent) -> list[NewEvent | Spawn]:
        """A task still running past its timeout is escalated to its role's escalation target."""
        if message.type != "timer.fired" or message.data["payload"].get("timer_id") != s.timer_id:
            return []
        target = role(s.role).config.escalate_to if s.role not in ("developer", "qa") else "tech_lead"
        timed_out = NewEvent.of(TaskTimedOut(**s.ids(), role=s.role, timeout_s=s.timeout_s))
        if target == s.role:  # the top of the escalation chain: nobody left to hand it to
            reason = f"timed out after {s.timeout_s:.0f}s at {s.role}, the top of the escalation chain"
            return [timed_out, NewEvent.of(TaskFailed(**s.ids(), role=s.role, reason=reason))]
        return [
            timed_out,
            NewEvent.of(
                TaskEscalated(**s.ids(), from_role=s.role, to_role=target, reason=f"no result in {s.timeout_s:.0f}s")
            ),
            NewEvent.of(TaskAssigned(**s.ids(), role=target, phase=s.phase, priority=s.priority, deadline=s.deadline)),
        ]

    def attempted(
        self,
        s: TaskState,
        n: int,
        approach: int,
        output: str,
        valid: bool,
        score: float,
        issues: list[str],
        **more: Any,
    ) -> NewEvent:
        """This role's attempt ``n`` as recorded: its output and its own verdict on it."""
        return NewEvent.of(
            TaskAttempted(
                **s.ids(),
                role=self.me,
                attempt=n,
                approach=approach,
                output=output,
                valid=valid,
                score=score,
                issues=issues,
                **more,
            )
        )

    def next_attempt(self, s: TaskState) -> tuple[int, int] | None:
        n = len(s.attempts) + 1
        if n > ATTEMPTS_PER_APPROACH * APPROACHES:
            return None
        return n, (n - 1) // ATTEMPTS_PER_APPROACH + 1

    def ready_for_review(self, s: TaskState) -> bool:
        last = s.attempts[-1] if s.attempts else None
        return bool(last and last.valid and last.score >= PASS_SCORE and last.attempt != s.reviewed_attempt)

    def request_review(self, s: TaskState) -> list[NewEvent | Spawn]:
        reviewer = role(self.me).config.reviewer
        return [
            NewEvent.of(
                ReviewRequested(**s.ids(), role=reviewer, owner=self.me, priority=s.priority, deadline=s.deadline)
            )
        ]

    def give_up(self, s: TaskState) -> list[NewEvent | Spawn]:
        reason = f"no attempt passed after {len(s.attempts)} attempts and {APPROACHES} approaches"
        return [
            NewEvent.of(TaskFailed(**s.ids(), role=self.me, reason=reason)),
            NewEvent.of(
                TaskEscalated(**s.ids(), from_role=self.me, to_role=role(self.me).config.escalate_to, reason=reason)
            ),
        ]

    async def work(self, s: TaskState, run: RunConfig) -> list[NewEvent | Spawn]:
        """Generic task: do it, score it yourself, fix it below 7 (3 tries), then change approach."""
        if self.ready_for_review(s):
            return self.request_review(s)
        nxt = self.next_attempt(s)
        if nxt is None:
            return self.give_up(s)
        n, approach = nxt
        r = role(self.me)
        feedback = s.feedback + [i for a in s.attempts[-1:] for i in a.issues]
        ev, work = await self.services.ask(
            s.completions, f"work:{n}", self.me, run, r.work_prompt(s, n, approach, feedback), recorder=self.recorder(s)
        )
        if ev:
            return ev
        assert work is not None
        ev, check = await self.services.ask(
            s.completions,
            f"validate:{n}",
            self.me,
            run,
            r.validate_prompt(s, work.text),
            VALIDATION_SCHEMA,
            recorder=self.recorder(s),
        )
        if ev:
            return ev
        assert check is not None
        v = check.structured or {}
        issues = [str(i) for i in v.get("issues", [])]
        return [
            self.attempted(s, n, approach, work.text, bool(v.get("valid", False)), finite(v.get("score", 0)), issues)
        ]

    async def review(self, s: TaskState, run: RunConfig) -> list[NewEvent | Spawn]:
        output = s.attempts[-1].output if s.attempts else ""
        if s.files:
            output += "\n" + "\n".join(f"--- {p}\n{c}" for p, c in sorted(s.files.items()))
        ev, answer = await self.services.ask(
            s.completions,
            f"review:{s.reviews + 1}",
            self.me,
            run,
            role(self.me).review_prompt(s, output),
            REVIEW_SCHEMA,
            recorder=self.recorder(s),
        )
        if ev:
            return ev
        assert answer is not None
        v = answer.structured or {}
        approved = bool(v.get("approved", False))
        comments = str(v.get("comments", ""))
        return [
            NewEvent.of(
                TaskReviewed(
                    **s.ids(),
                    role=self.me,
                    owner=s.role,
                    approved=approved,
                    comments=comments,
                    priority=s.priority,
                    deadline=s.deadline,
                )
            )
        ]

    async def finish(self, s: TaskState, run: RunConfig) -> list[NewEvent | Spawn]:
        out: list[NewEvent | Spawn] = []
        if s.kind == "implement" and s.merged is None and s.branch:
            branch, approver = s.branch, s.approved_by or ""
            files = {**s.files, **s.tests}

            def merge(root: Path) -> str:
                if s.branch not in GitWorkspace.init_or_clone(root).repo.heads:  # a fork's repository: rebuild it
                    _commit(root, s.task_id, files, s.role)
                # A repeated step (the append lost to a conflict, a crash after the merge) finds the branch merged.
                return _merge(root, branch, approver)

            try:
                sha = await self.services.in_workspace(run, merge)
            except WORKSPACE_ERRORS as e:  # e.g. main got a conflicting change meanwhile; the branch stays as it is
                reason = f"approved but not merged: {self.told(e, run)}"
                return [NewEvent.of(TaskFailed(**s.ids(), role=self.me, reason=reason))]
            out.append(NewEvent.of(TaskMerged(**s.ids(), branch=branch, commit=sha, approved_by=approver)))
            result = f"merged {branch} into main as {sha[:10]}, approved by {approver}"
        else:
            result = s.attempts[-1].output if s.attempts else ""
        out.append(NewEvent.of(TaskCompleted(**s.ids(), role=self.me, result=result)))
        note = NewEvent.of(MemoryNoted(role=self.me, run_id=s.run_id, key=s.title, content=result[:2000]))
        out.append(Spawn(f"memory-{self.me}", [note]))
        return out

    # ---- the TDD flow: QA writes the tests, the developer makes them pass --------------------------------

    async def write_tests(self, s: TaskState, run: RunConfig) -> list[NewEvent | Spawn]:
        """QA's phase, or the role the task was escalated to (the tech lead when QA timed out)."""
        ev, answer = await self.services.ask(
            s.completions,
            "tests:1",
            self.me,
            run,
            role(self.me).tests_prompt(s),
            FILES_SCHEMA,
            recorder=self.recorder(s),
        )
        if ev:
            return ev
        assert answer is not None
        try:
            files = _files(answer)
            branch, sha = await self.services.in_workspace(run, lambda root: _commit(root, s.task_id, files, self.me))
        except WORKSPACE_ERRORS as e:
            reason = f"the tests could not be written: {self.told(e, run)}"
            return [NewEvent.of(TaskFailed(**s.ids(), role=self.me, reason=reason))]
        return [
            NewEvent.of(FilesWritten(**s.ids(), role=self.me, branch=branch, files=files, commit=sha)),
            NewEvent.of(
                TaskAssigned(**s.ids(), role="developer", phase="code", priority=s.priority, deadline=s.deadline)
            ),
        ]

    async def code(self, s: TaskState, run: RunConfig) -> list[NewEvent | Spawn]:
        if self.ready_for_review(s):
            return self.request_review(s)
        nxt = self.next_attempt(s)
        if nxt is None:
            return self.give_up(s)
        n, approach = nxt
        failures = s.feedback + [i for a in s.attempts[-1:] for i in a.issues]
        prompt = role(self.me).code_prompt(s, n, approach, s.tests, failures)  # the developer's, or the escalated-to
        ev, answer = await self.services.ask(
            s.completions, f"code:{n}", self.me, run, prompt, FILES_SCHEMA, recorder=self.recorder(s)
        )
        if ev:
            return ev
        assert answer is not None

        def write_and_test(root: Path, files: dict[str, str]) -> tuple[str, str, dict[str, Any]]:
            # On top of what the log says the branch holds (QA's tests last, so they decide): the same content
            # changes nothing, and a repository that lacks them (a fork's, rebuilt from its events) gets them.
            branch, sha = _commit(root, s.task_id, {**s.files, **files, **s.tests}, self.me)
            report = asyncio.run(run_pytest(root, timeout_s=float(s.spec.get("test_timeout_s", 60))))
            return branch, sha, report.model_dump(mode="json")

        try:
            files, refused = _developer_files(_files(answer), s.tests)
            branch, sha, report = await self.services.in_workspace(run, lambda root: write_and_test(root, files))
        except WORKSPACE_ERRORS as e:  # nothing of the answer is left in the tree; the next attempt gets the error
            issue = f"the files could not be written: {self.told(e, run)}"
            return [self.attempted(s, n, approach, f"attempt {n} (approach {approach}): {issue}", False, 0.0, [issue])]
        count, passed = report["count"], report["passed"]
        issues = refused + [f"{f['name']}: {f['message']}" for f in report["failures"]]
        if count == 0:
            issues.append("no tests ran: " + report.get("output_tail", "")[-300:])
        summary = f"attempt {n} (approach {approach}): {passed}/{count} tests passed"
        valid = bool(count and passed == count and not report["timed_out"])
        score = round(10.0 * passed / count, 2) if count else 0.0
        tests = {k: report[k] for k in ("passed", "failed", "errors", "count", "timed_out")}
        return [
            NewEvent.of(FilesWritten(**s.ids(), role=self.me, branch=branch, files=files, commit=sha)),
            self.attempted(s, n, approach, summary, valid, score, issues, tests=tests),
        ]


def finite(score: Any) -> float:
    """A validator's score as recorded: one that is not a finite number (JSON from a model may say NaN) is 0."""
    value = float(score)
    return value if math.isfinite(value) else 0.0


def _files(answer: Completed) -> dict[str, str]:
    files = (answer.structured or {}).get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ValueError("the answer has no files mapping")
    return {str(k): v for k, v in files.items()}


def _shadows_pytest(path: str) -> bool:
    top = path.split("/", 1)[0]
    return top.removesuffix(".py") in PYTEST_SHADOWS and (top.endswith(".py") or "/" in path)


def _developer_files(files: dict[str, str], tests: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The answer's files less those that would change how QA's tests judge the code (QA's test files, any
    ``conftest.py``, pytest's config files at the root, a module or package at the root named like pytest or one
    of its own), and a refusal for each; an unchanged copy of a QA file is dropped without one."""
    qa = {posixpath.normpath(path): content for path, content in tests.items()}
    kept: dict[str, str] = {}
    refused: list[str] = []
    for path, content in files.items():
        norm = posixpath.normpath(path)
        if norm in qa:
            if content != qa[norm]:
                refused.append(f"refused {path}: QA's tests are not the developer's to change")
        elif norm in PYTEST_CONFIG or posixpath.basename(norm) == "conftest.py" or _shadows_pytest(norm):
            refused.append(f"refused {path}: it would change how pytest runs QA's tests")
        else:
            kept[path] = content
    return kept, refused


def _commit(root: Path, task_id: str, files: dict[str, str], author: str) -> tuple[str, str]:
    """Write ``files`` on the task's branch and commit them; rewriting the same content (a redelivered step)
    commits nothing and returns the current head.

    Every path is checked before any file is written, and a failure half-way puts the tree back at the branch's
    head: a dirty tree blocked every later task of the run, or went into another task's commit."""
    repo = GitWorkspace.init_or_clone(root)
    repo.discard_changes()  # what an earlier test run left (files its tests wrote) is no part of this task's commit
    branch = repo.branch_for_task(task_id)
    try:
        for path in files:
            repo.workspace.resolve(path)  # PathEscapeError for a path outside the tree or inside .git
        if not repo.workspace.exists(".gitignore"):
            repo.workspace.write(".gitignore", "__pycache__/\n.pytest_cache/\n")
        for path, content in files.items():
            repo.workspace.write(path, content)
        if not repo.add():
            return branch, repo.repo.head.commit.hexsha
        return branch, repo.commit(author=author).sha
    except Exception:
        repo.discard_changes()
        raise


def _merge(root: Path, branch: str, approver: str) -> str:
    """Merge the approved branch into main; a repeated step finds it merged and returns the merge commit that
    brought it in (main's head when that cannot be told)."""
    repo = GitWorkspace(root)
    tip = repo.repo.heads[branch].commit
    main = repo.repo.heads[MAIN].commit
    if repo.repo.is_ancestor(tip, main):
        return _merged_by(repo, tip.hexsha) or main.hexsha
    try:
        return repo.merge_to_main(branch, approved_by=approver, author=approver).sha
    except AlreadyMergedError as e:
        return e.main_sha


def _merged_by(repo: GitWorkspace, tip: str) -> str | None:
    """The merge commit on main's first-parent line whose merged parent is ``tip``."""
    for commit in repo.repo.iter_commits(MAIN, first_parent=True, max_count=1000):
        if len(commit.parents) > 1 and any(p.hexsha == tip for p in commit.parents[1:]):
            return commit.hexsha
    return None

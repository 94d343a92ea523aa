"""A team step that fails in git or the file tool, and a timer that fires after the task was handed on, end in a
recorded outcome (or none), never in a dropped step that leaves the task to its timeout; and a developer's answer
cannot change how QA's tests judge it. Real git repositories and real pytest runs, no Ray, no LLM."""

from __future__ import annotations

from pathlib import Path

import pytest
from git import GitCommandError, Repo

from actors.agents.team.services import Completed, TeamServices, fold_run
from actors.agents.team.task import CEO_LOOP, Attempt, Task, TaskState, _commit, evolve_task
from actors.entity import Context, Spawn
from actors.llm.base import Completion, CompletionRequest
from actors.tools import PathEscapeError
from events import NewEvent
from events.team import FilesWritten, RunForked, RunStarted, TaskAssigned, TaskCreated, TaskMerged
from storage.eventlog import EventLog
from tests.test_team_steps import ADD_CODE, ADD_TESTS, fold, implement_task, message, no_llm, recorded, services

CTX = Context("task-r1.t1")
BROKEN_ADD = "def add(a, b):\n    return 0\n"
TRIVIAL_TEST = "def test_add():\n    assert True\n"
ALWAYS_PASS = """import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    outcome.get_result().outcome = "passed"
"""


# Stands in for pytest under ``python -m pytest``: a JUnit report of one passing test, wherever it is asked for.
FAKE_PYTEST = """import sys
out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--junitxml="))
open(out, "w").write('<testsuites><testsuite tests="1" failures="0" errors="0" skipped="0">'
                     '<testcase classname="t" name="test_ok"/></testsuite></testsuites>')
print("1 passed")
"""


def types(decided: list[NewEvent | Spawn]) -> list[str]:
    return [e.type for e in decided if isinstance(e, NewEvent)]


def status(root: Path) -> str:
    return Repo(root).git.status("--porcelain")


def test_a_commit_that_fails_leaves_the_tree_clean(tmp_path: Path) -> None:
    """A dirty tree would block every later task of the run (DirtyWorkspaceError), or go into another's commit."""
    root = tmp_path / "ws"
    with pytest.raises(PathEscapeError):
        _commit(root, "r1.t1", {"a.py": "x", "../e.py": "y"}, "developer")  # checked before anything is written
    assert status(root) == "" and not (root / "a.py").exists() and not (tmp_path / "e.py").exists()
    _commit(root, "r1.t1", {"a.py": "1\n"}, "developer")
    for files in ({"a.py": "2\n", ".git/config": "y"}, {"a.py": "2\n", "new.py": "n", "a.py/b.py": "y"}):
        with pytest.raises((PathEscapeError, OSError)):  # the second fails half-way: a.py is a file, not a directory
            _commit(root, "r1.t1", files, "developer")
        assert status(root) == "" and (root / "a.py").read_text() == "1\n" and not (root / "new.py").exists()
    assert _commit(root, "r1.t2", {"b.py": "2\n"}, "developer")[0] == "task/r1.t2"  # the next task is not blocked


def test_files_a_test_run_left_in_the_tree_go_into_no_commit(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    _commit(root, "r1.t1", {"a.py": "1\n"}, "developer")
    (root / "output.log").write_text("written by a test of r1.t1")
    _, sha = _commit(root, "r1.t2", {"b.py": "2\n"}, "developer")
    assert sorted(Repo(root).git.show("--name-only", "--format=", sha).split()) == [".gitignore", "b.py"]
    assert status(root) == ""


async def test_an_answer_the_workspace_refuses_is_an_attempt_and_the_next_one_is_told_why(tmp_path: Path) -> None:
    """Not an exception the role only logs: the attempt is recorded with the error, and the next attempt asks the
    model again with it (the escalated-to role used to reuse the same recorded answer)."""
    asked: list[str] = []

    async def complete(request: CompletionRequest) -> Completion:
        asked.append(request.last_user_message())
        files = {"files": {}}
        return Completion(
            text="", structured=files, provider="s", model="m", prompt_tokens=1, completion_tokens=1, latency_ms=1
        )

    svc = services(tmp_path, complete)
    tests = {"tests/test_add.py": ADD_TESTS}
    await svc.in_workspace(await svc.run("r1"), lambda root: _commit(root, "r1.t1", tests, "qa"))
    answer = Completed(text="", structured={"files": {"add_util.py": ADD_CODE, "../x.py": "pwned"}})
    s = implement_task(role="developer", phase="code", tests=tests, completions={"code:1": answer})
    developer = Task("developer", svc)
    out = await developer.decide(s, message("task.assigned"), CTX)
    (attempt,) = out
    assert isinstance(attempt, NewEvent) and attempt.type == "task.attempted"
    assert not attempt.data["valid"] and attempt.data["attempt"] == 1
    assert attempt.data["issues"] == ["the files could not be written: path escapes the workspace: ../x.py"]
    assert status(tmp_path / "ws") == "" and not (tmp_path / "x.py").exists()
    s = fold(evolve_task, s, out)
    again = await developer.decide(s, message("task.assigned"), CTX)
    assert types(again) == ["llm.completed"] and again[0].data["purpose"] == "code:2"  # type: ignore[union-attr]
    assert "Failing: the files could not be written: path escapes the workspace: ../x.py" in asked[0]


async def test_an_os_error_is_told_with_paths_inside_the_workspace(tmp_path: Path) -> None:
    """The model and the log are told which file, not where the service keeps its workspaces."""
    svc = services(tmp_path)
    tests = {"tests/test_add.py": ADD_TESTS}
    await svc.in_workspace(await svc.run("r1"), lambda root: _commit(root, "r1.t1", tests, "qa"))
    answer = Completed(text="", structured={"files": {"tests": "a file where QA's directory is\n"}})
    s = implement_task(role="developer", phase="code", tests=tests, completions={"code:1": answer})
    (attempt,) = await Task("developer", svc).decide(s, message("task.assigned"), CTX)
    assert isinstance(attempt, NewEvent) and not attempt.data["valid"]
    (issue,) = attempt.data["issues"]
    assert issue.startswith("the files could not be written: [Errno 21] Is a directory: 'tests'"), issue
    assert str(tmp_path) not in issue
    run = await svc.run("r1")
    root = svc.workspace_dir(run)
    told = Task("developer", svc).told(OSError(f"'{root}' and '{root}/a.py', not '{root}-fork/a.py'"), run)
    assert told == f"'.' and 'a.py', not '{root}-fork/a.py'"  # a sibling named like it is another directory


async def test_a_failure_of_the_machine_is_no_outcome_of_the_task(tmp_path: Path) -> None:
    """A lock git left behind (a killed process), like a full disk, says nothing of the answer: the step fails and
    is tried again, not recorded as the model's failed attempt (one of six) or the task's failure."""
    svc = services(tmp_path)
    tests = {"tests/test_add.py": ADD_TESTS}
    await svc.in_workspace(await svc.run("r1"), lambda root: _commit(root, "r1.t1", tests, "qa"))
    (tmp_path / "ws" / ".git" / "index.lock").touch()
    code = Completed(text="", structured={"files": {"add_util.py": ADD_CODE}})
    s = implement_task(role="developer", phase="code", tests=tests, completions={"code:1": code})
    with pytest.raises(GitCommandError, match=r"index\.lock"):
        await Task("developer", svc).decide(s, message("task.assigned"), CTX)


async def test_an_approved_branch_that_conflicts_with_main_fails_the_task_naming_the_files(tmp_path: Path) -> None:
    """Two tasks wrote the same new file; the second merge conflicts: a recorded failure, not a task in progress
    until its timeout."""
    svc = services(tmp_path)
    run = await svc.run("r1")
    for tid, text in (("r1.t1", "A = 1\n"), ("r1.t2", "A = 2\n")):
        await svc.in_workspace(run, lambda root, tid=tid, text=text: _commit(root, tid, {"shared.py": text}, "dev"))
    developer = Task("developer", svc)
    first = implement_task(role="developer", phase="code", branch="task/r1.t1", approved_by="tech_lead")
    assert types(await developer.decide(first, message("task.reviewed"), CTX)) == ["task.merged", "task.completed"]
    main = Repo(tmp_path / "ws").heads["main"].commit.hexsha
    second = implement_task(
        task_id="r1.t2", role="developer", phase="code", branch="task/r1.t2", approved_by="tech_lead"
    )
    out = await developer.decide(second, message("task.reviewed"), Context("task-r1.t2"))
    assert types(out) == ["task.failed"]
    reason = out[0].data["reason"]  # type: ignore[union-attr]
    assert reason == "approved but not merged: merging task/r1.t2 into main conflicts in: shared.py"
    assert fold(evolve_task, second, out).status == "failed"
    assert status(tmp_path / "ws") == "" and Repo(tmp_path / "ws").heads["main"].commit.hexsha == main


async def developer_answers(tmp_path: Path, files: dict[str, str]) -> list[NewEvent | Spawn]:
    """The developer's coding step on QA's test of ``add``, its answer ``files``."""
    svc = services(tmp_path)
    tests = {"tests/test_add.py": ADD_TESTS}
    await svc.in_workspace(await svc.run("r1"), lambda root: _commit(root, "r1.t1", tests, "qa"))
    code = Completed(text="", structured={"files": files})
    s = implement_task(role="developer", phase="code", tests=tests, completions={"code:1": code})
    return await Task("developer", svc).decide(s, message("task.assigned"), CTX)


@pytest.mark.parametrize(
    "answer",
    [
        {"tests/test_add.py": TRIVIAL_TEST},
        {"tests/./test_add.py": TRIVIAL_TEST},
        {"conftest.py": ALWAYS_PASS},
        {"tests/conftest.py": ALWAYS_PASS},
        {"pytest.ini": "[pytest]\ntestpaths = mine\n", "mine/test_mine.py": TRIVIAL_TEST},
        {"pytest.toml": '[pytest]\naddopts = ["-k", "test_mine"]\n', "test_mine.py": TRIVIAL_TEST},
        {"pytest.py": FAKE_PYTEST},
        {"pytest/__main__.py": FAKE_PYTEST},
    ],
    ids=[
        "replaced",
        "replaced-by-another-name",
        "conftest",
        "nested-conftest",
        "config",
        "toml-config",
        "pytest-module",
        "pytest-package",
    ],
)
async def test_qas_tests_judge_the_developers_code(tmp_path: Path, answer: dict[str, str]) -> None:
    """Each of these answers passes its tests when written as given; QA's test still fails the broken add."""
    written, attempted = await developer_answers(tmp_path, {"add_util.py": BROKEN_ADD, **answer})
    assert isinstance(written, NewEvent) and isinstance(attempted, NewEvent)
    assert not attempted.data["valid"] and attempted.data["tests"]["failed"] == 1
    assert any(i.startswith("refused ") for i in attempted.data["issues"])
    assert "add_util.py" in written.data["files"] and not {"conftest.py", "pytest.ini"} & set(written.data["files"])
    assert Repo(tmp_path / "ws").git.show("task/r1.t1:tests/test_add.py") + "\n" == ADD_TESTS


async def test_an_unchanged_copy_of_qas_tests_is_no_refusal(tmp_path: Path) -> None:
    _, attempted = await developer_answers(tmp_path, {"add_util.py": ADD_CODE, "tests/test_add.py": ADD_TESTS})
    assert isinstance(attempted, NewEvent) and attempted.data["valid"] and attempted.data["issues"] == []


async def test_a_timer_of_the_role_a_task_was_handed_on_from_does_nothing(tmp_path: Path) -> None:
    """QA's timer fires after QA handed the task to the developer: the developer's own start arms its timer."""
    created = TaskCreated(task_id="r1.t1", run_id="r1", title="add", kind="implement", role="qa", timeout_s=60)
    s = evolve_task(TaskState(), recorded(NewEvent.of(created)))
    s = fold(evolve_task, s, Task("qa", services(tmp_path)).start(s))
    qa_timer = s.timer_id
    fired = message("timer.fired", timer_id=qa_timer, scheduled_position=1, payload={"timer_id": qa_timer})
    ceo = Task(CEO_LOOP, services(tmp_path))
    assert types(await ceo.decide(s, fired, CTX)) == ["task.timed_out", "task.escalated", "task.assigned"]
    files = FilesWritten(task_id="r1.t1", run_id="r1", role="qa", branch="task/r1.t1", files={}, commit="c")
    assigned = TaskAssigned(task_id="r1.t1", run_id="r1", role="developer", phase="code")
    s = fold(evolve_task, s, [NewEvent.of(files), NewEvent.of(assigned)])
    assert await ceo.decide(s, fired, CTX) == []
    s = fold(evolve_task, s, Task("developer", services(tmp_path)).start(s))
    assert s.timer_id != qa_timer and await ceo.decide(s, fired, CTX) == []


async def test_a_repository_without_the_branch_is_rebuilt_from_what_the_log_recorded(tmp_path: Path) -> None:
    """A fork's run has its own repository, empty: its developer still runs QA's tests (from the task's events),
    and an approval merges what the events say the branch holds, instead of failing on a branch that is not there."""
    svc = services(tmp_path)  # tmp_path / "ws" does not exist yet, as a fork's workspace
    tests = {"tests/test_add.py": ADD_TESTS}
    fix = Completed(text="", structured={"files": {"add_util.py": ADD_CODE}})
    s = implement_task(role="developer", phase="code", tests=tests, completions={"code:2": fix})
    s.files = {"add_util.py": BROKEN_ADD, "helper.py": "X = 1\n"}  # the first attempt's files, as recorded
    s.attempts = [Attempt(attempt=1, approach=1, output="1/1 failed", valid=False, score=0.0, issues=["add"])]
    _, attempted = await Task("developer", svc).decide(s, message("task.assigned"), CTX)
    assert isinstance(attempted, NewEvent) and attempted.data["valid"]
    assert attempted.data["tests"]["passed"] == 1  # QA's tests were written although the repository lacked them
    assert Repo(tmp_path / "ws").git.show("task/r1.t1:helper.py") == "X = 1"

    fresh = services(tmp_path / "fork")  # approved, and merged in a repository that never saw the branch
    approved = implement_task(
        role="developer",
        phase="code",
        tests=tests,
        files={"add_util.py": ADD_CODE},
        branch="task/r1.t1",
        approved_by="tech_lead",
    )
    out = await Task("developer", fresh).decide(approved, message("task.reviewed"), CTX)
    assert types(out) == ["task.merged", "task.completed"]
    main = Repo(tmp_path / "fork" / "ws").heads["main"].commit
    assert {b.path for b in main.tree.traverse()} >= {"add_util.py", "tests/test_add.py"}


async def test_a_forks_repository_has_the_tasks_merged_before_the_fork_point(
    tmp_path: Path, eventlog: EventLog
) -> None:
    """Its repository starts new: what the tasks merged before the fork point recorded goes onto its main first,
    so a later task that builds on their code finds it (and the original's repository is not used)."""
    run = "r1_fab"
    await eventlog.append(f"run-{run}", [NewEvent.of(RunStarted(run_id=run, goal="g", workspace="shared"))])
    await eventlog.append(f"run-{run}", [NewEvent.of(RunForked(run_id=run, from_run="r1", at_position=9))])
    ids = {"task_id": f"{run}.t1", "run_id": run}
    written = [
        FilesWritten(**ids, role="qa", branch="b", files={"tests/test_add.py": ADD_TESTS}, commit="c1"),
        FilesWritten(**ids, role="developer", branch="b", files={"add_util.py": BROKEN_ADD}, commit="c2"),
        FilesWritten(**ids, role="developer", branch="b", files={"add_util.py": ADD_CODE}, commit="c3"),
    ]
    merged = TaskMerged(**ids, branch="b", commit="c4", approved_by="tech_lead")
    await eventlog.append(f"task-{run}.t1", [NewEvent.of(e) for e in [*written, merged]])
    unmerged = FilesWritten(task_id=f"{run}.t2", run_id=run, role="qa", branch="b2", files={"x.py": "X"}, commit="c")
    await eventlog.append(f"task-{run}.t2", [NewEvent.of(unmerged)])
    svc = TeamServices(eventlog, no_llm, tmp_path)
    cfg = await svc.run(run)
    tree = await svc.in_workspace(cfg, lambda root: {b.path for b in Repo(root).heads["main"].commit.tree.traverse()})
    assert {"add_util.py", "tests/test_add.py"} <= tree and "x.py" not in tree
    assert (tmp_path / run / "add_util.py").read_text() == ADD_CODE and not (tmp_path / "shared").exists()


def test_a_forked_run_has_its_own_workspace() -> None:
    started = RunStarted(run_id="r1", goal="g", workspace="shared")
    forked = RunForked(run_id="r1_f1", from_run="r1", at_position=5)
    cfg = fold_run([recorded(NewEvent.of(started), "run-r1"), recorded(NewEvent.of(forked), "run-r1_f1", 2)])
    assert cfg is not None and cfg.run_id == "r1_f1" and cfg.workspace is None

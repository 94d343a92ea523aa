"""The developer-agent tools against real directories, real git and real pytest/jest subprocesses."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import git
import pytest

from actors.tools import (
    AlreadyMergedError,
    ApprovalRequiredError,
    DirtyWorkspaceError,
    FileTooLargeError,
    GitWorkspace,
    GitWorkspaceError,
    MergeConflictError,
    NothingToCommitError,
    OptionLikeRevisionError,
    OutlineError,
    PathEscapeError,
    RunKilledError,
    UndoConflictError,
    Workspace,
    outline,
    outline_file,
    run_jest,
    run_pytest,
    run_tests,
)

# ---------------------------------------------------------------- file system


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Workspace, Path]:
    """A workspace with a sibling directory outside it, to prove nothing lands there."""
    root = tmp_path / "ws"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret")
    return Workspace(root), outside


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_path_escapes_are_refused_and_nothing_is_written_outside(sandbox: tuple[Workspace, Path]) -> None:
    ws, outside = sandbox
    before = tree(outside)
    (ws.root / "link").symlink_to(outside, target_is_directory=True)
    (ws.root / "filelink").symlink_to(outside / "secret.txt")

    escapes = [
        "../outside/pwned.txt",
        "a/../../outside/pwned.txt",
        str(outside / "pwned.txt"),
        "/etc/passwd",
        "link/pwned.txt",
        "filelink",
        ".git/hooks/pre-commit",
    ]
    for rel in escapes:
        with pytest.raises(PathEscapeError):
            ws.resolve(rel)
        with pytest.raises(PathEscapeError):
            ws.write(rel, "pwned")
        with pytest.raises(PathEscapeError):
            ws.create(rel, "pwned")
        with pytest.raises(PathEscapeError):
            ws.read(rel)
        with pytest.raises(PathEscapeError):
            ws.delete(rel)
    with pytest.raises(PathEscapeError):
        ws.find("../outside/*")
    assert ws.find("link/*") == []  # a symlinked directory's contents are outside, so never listed

    assert tree(outside) == before
    assert ws.history == []
    assert isinstance(PathEscapeError("x"), ValueError)
    # Inside paths, including ones with a harmless "..", still work.
    assert ws.resolve("a/../b.txt") == ws.root / "b.txt"


def test_write_modify_delete_and_undo_restore_exact_content(sandbox: tuple[Workspace, Path]) -> None:
    ws, _ = sandbox
    original = "line one\r\nline two\n\tünïcode ✓\n"
    created = ws.create("pkg/mod.py", original)
    assert created.action == "created" and created.before is None and created.after == original
    assert ws.read("pkg/mod.py") == original  # line endings untouched
    with pytest.raises(FileExistsError):
        ws.create("pkg/mod.py", "again")

    modified = ws.write("pkg/mod.py", "changed\n")
    assert modified.action == "modified" and modified.before == original
    assert modified.sha256_before == created.sha256_after and modified.sha256_after != modified.sha256_before

    deleted = ws.delete("pkg/mod.py")
    assert deleted.action == "deleted" and deleted.before == "changed\n" and not ws.exists("pkg/mod.py")
    assert [c.action for c in ws.history] == ["created", "modified", "deleted"]

    ws.undo_last()  # re-creates the deleted file
    assert ws.read("pkg/mod.py") == "changed\n"
    ws.undo_last()  # back to the original bytes
    assert (ws.root / "pkg/mod.py").read_bytes() == original.encode("utf-8")
    ws.undo_last()  # removes the created file
    assert not ws.exists("pkg/mod.py")
    assert ws.undo_last() is None

    # Undoing an older change over a newer one would lose the newer edit: refused unless forced.
    first = ws.write("notes.md", "v1")
    ws.write("notes.md", "v2")
    with pytest.raises(UndoConflictError):
        ws.undo(first)
    ws.undo(first, force=True)
    assert not ws.exists("notes.md")


def test_limits_find_and_list(sandbox: tuple[Workspace, Path]) -> None:
    ws, _ = sandbox
    small = Workspace(ws.root, max_file_bytes=10)
    with pytest.raises(FileTooLargeError, match="limit is 10 bytes"):
        small.write("big.txt", "x" * 11)
    assert not ws.exists("big.txt")
    (ws.root / "huge.txt").write_text("y" * 11)
    with pytest.raises(FileTooLargeError):
        small.read("huge.txt")

    for rel in ["a.py", "pkg/b.py", "pkg/sub/c.py", "pkg/readme.md", ".hidden/d.py"]:
        ws.write(rel, "x = 1\n")
    (ws.root / ".git").mkdir()
    (ws.root / ".git" / "e.py").write_text("")
    assert ws.find("**/*.py") == ["a.py", "pkg/b.py", "pkg/sub/c.py"]
    assert ws.find("**/*.py", include_hidden=True) == [".hidden/d.py", "a.py", "pkg/b.py", "pkg/sub/c.py"]
    assert ws.find("pkg/*.md") == ["pkg/readme.md"]
    assert ws.find("*.py") == ["a.py"] and ws.find("pkg/**") == ["pkg/b.py", "pkg/readme.md", "pkg/sub", "pkg/sub/c.py"]
    (ws.root / "pkg" / "sub" / "loop").symlink_to("..", target_is_directory=True)  # listed, never walked into
    assert ws.find("**/*.py") == ["a.py", "pkg/b.py", "pkg/sub/c.py"]
    assert "pkg/sub/loop" in ws.find("**/loop")
    with pytest.raises(PathEscapeError):
        ws.write("vendor/.git/config", "x")  # nested git dirs are off limits too
    assert ws.list_dir() == [".hidden/", "a.py", "huge.txt", "pkg/"]
    assert ws.list_dir("pkg") == ["pkg/b.py", "pkg/readme.md", "pkg/sub/"]


# ---------------------------------------------------------------- AST outline

SAMPLE = '''
"""Module docstring."""
import asyncio


class Store(Base, metaclass=Meta):
    """Keeps things.

    More detail here.
    """

    def get(self, key: str, default: int = 1) -> int:
        """Return the value."""
        return default

    @staticmethod
    async def fetch(*args, timeout: float = 1.0, **kw) -> None:
        pass

    class Inner:
        def deep(self):
            def local():
                pass


async def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    return 0


def plain(a, /, b=2, *, c: int = 3):
    return a
'''


def test_outline_of_a_module(sandbox: tuple[Workspace, Path]) -> None:
    items = {i.qualname: i for i in outline(SAMPLE)}
    assert list(items) == ["Store", "Store.get", "Store.fetch", "Store.Inner", "Store.Inner.deep", "main", "plain"]

    store = items["Store"]
    assert (store.kind, store.signature, store.docstring) == (
        "class",
        "class Store(Base, metaclass=Meta)",
        "Keeps things.",
    )
    assert (store.line, store.end_line) == (6, 23)
    get = items["Store.get"]
    assert get.kind == "method" and get.signature == "def get(self, key: str, default: int = 1) -> int"
    assert get.docstring == "Return the value." and get.line == 12 and get.depth == 1
    fetch = items["Store.fetch"]
    assert fetch.kind == "async method" and fetch.decorators == ["staticmethod"]
    assert fetch.signature == "async def fetch(*args, timeout: float = 1.0, **kw) -> None" and fetch.docstring is None
    assert items["Store.Inner.deep"].depth == 2
    main = items["main"]
    assert main.kind == "async function" and main.signature == "async def main(argv: list[str] | None = None) -> int"
    assert main.docstring == "Entry point."
    assert items["plain"].kind == "function" and items["plain"].signature == "def plain(a, /, b=2, *, c: int = 3)"

    ws, _ = sandbox
    ws.write("pkg/sample.py", SAMPLE)
    assert [i.qualname for i in outline_file(ws, "pkg/sample.py")] == list(items)


def test_outline_reports_syntax_errors_with_the_line(sandbox: tuple[Workspace, Path]) -> None:
    with pytest.raises(OutlineError, match="line 3") as err:
        outline("def ok():\n    pass\ndef broken(:\n    pass\n")
    assert err.value.line == 3
    ws, _ = sandbox
    ws.write("bad.py", "class X:\n  def f(self)\n")
    with pytest.raises(OutlineError, match=r"bad\.py:line 2"):
        outline_file(ws, "bad.py")


# ---------------------------------------------------------------- git


@pytest.fixture(autouse=True)
def no_global_git_identity(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits must work on a machine with no global git config (so no user.name/user.email)."""
    empty = tmp_path_factory.getbasetemp() / "empty-gitconfig"
    empty.touch()
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def repo(tmp_path: Path) -> GitWorkspace:
    return GitWorkspace.init_or_clone(tmp_path / "project")


def test_init_creates_main_with_an_initial_commit(repo: GitWorkspace, tmp_path: Path) -> None:
    assert repo.current_branch == "main"
    [first] = repo.log(5)
    assert first.message.strip() == "initial commit" and first.files == [] and first.branch == "main"
    assert repo.repo.config_reader("repository").get_value("user", "name") == "agenthub"
    # Opening it again gives the same repository, not a re-init.
    again = GitWorkspace.init_or_clone(tmp_path / "project")
    assert again.log(5)[0].sha == first.sha


def test_branch_per_task_and_generated_commit_message(repo: GitWorkspace) -> None:
    assert repo.branch_for_task("42") == "task/42"
    assert repo.current_branch == "task/42"
    ws = repo.workspace
    ws.write("src/app.py", "print('hi')\nprint('there')\n")
    ws.write("README.md", "# project\n")
    with pytest.raises(NothingToCommitError):
        repo.commit()
    assert repo.has_changes()
    assert sorted(repo.add()) == ["README.md", "src/app.py"]
    info = repo.commit(author="coder-bot")
    subject, _, body = info.message.partition("\n\n")
    assert subject == "task 42: 2 files changed (+3 -0)"
    assert "A src/app.py (+2 -0)" in body and "A README.md (+1 -0)" in body
    assert info.files == ["README.md", "src/app.py"] and info.author == "coder-bot" and info.branch == "task/42"

    ws.write("README.md", "# project\nmore\n")
    ws.delete("src/app.py")
    repo.add(["README.md", "src/app.py"])
    second = repo.commit("explicit message")
    assert second.message.strip() == "explicit message" and second.files == ["README.md", "src/app.py"]
    assert [c.sha for c in repo.log(2)] == [second.sha, info.sha] and repo.head_sha() == second.sha
    assert not repo.has_changes()
    assert "explicit" not in repo.diff("main")  # the diff against main shows content, not messages
    assert "+more" in repo.diff("main")

    # Switching tasks with uncommitted edits is refused instead of carrying them over.
    ws.write("README.md", "dirty\n")
    with pytest.raises(DirtyWorkspaceError):
        repo.branch_for_task("43")
    ws.undo_last()
    assert repo.branch_for_task("43") == "task/43" and not ws.exists("README.md")
    assert repo.branch_for_task("42") == "task/42" and ws.read("README.md") == "# project\nmore\n"
    with pytest.raises(ValueError):
        repo.branch_for_task("../evil")
    with pytest.raises(PathEscapeError):
        repo.add(["../outside"])


def test_merge_to_main_requires_approval(repo: GitWorkspace) -> None:
    branch = repo.branch_for_task("7")
    repo.workspace.write("feature.py", "x = 1\n")
    repo.add()
    repo.commit()
    main_before = repo.repo.heads["main"].commit.hexsha

    for nobody in ("", "   "):
        with pytest.raises(ApprovalRequiredError):
            repo.merge_to_main(branch, approved_by=nobody)
    assert repo.repo.heads["main"].commit.hexsha == main_before

    merge = repo.merge_to_main(branch, approved_by="reviewer-bot\nApproved-by: forged")
    assert merge.branch == "main" and "\nApproved-by: reviewer-bot " in merge.message
    assert merge.message.count("\nApproved-by:") == 1  # the approver cannot forge another trailer
    assert merge.files == ["feature.py"]
    assert len(repo.repo.commit(merge.sha).parents) == 2  # a real merge commit (--no-ff)
    assert repo.current_branch == branch  # HEAD goes back where it was
    with pytest.raises(AlreadyMergedError, match="nothing to merge") as again:
        repo.merge_to_main(branch, approved_by="reviewer-bot")  # e.g. a redelivered merge step
    assert again.value.main_sha == merge.sha


def test_merge_conflict_is_aborted_and_reported(repo: GitWorkspace) -> None:
    repo.branch_for_task("base")
    repo.workspace.write("shared.txt", "base\n")
    repo.add()
    repo.commit()
    repo.merge_to_main("task/base", approved_by="lead")

    for task, text in (("a", "from a\n"), ("b", "from b\n")):
        repo.branch_for_task(task)
        repo.workspace.write("shared.txt", text)
        repo.add()
        repo.commit()
    repo.merge_to_main("task/a", approved_by="lead")
    main_before = repo.repo.heads["main"].commit.hexsha

    with pytest.raises(MergeConflictError) as err:
        repo.merge_to_main("task/b", approved_by="lead")
    assert err.value.files == ["shared.txt"] and "shared.txt" in str(err.value)
    assert not repo.is_dirty(untracked=True)
    assert not (repo.root / ".git" / "MERGE_HEAD").exists()
    assert repo.repo.heads["main"].commit.hexsha == main_before
    assert repo.current_branch == "task/b" and repo.workspace.read("shared.txt") == "from b\n"


def test_undo_last_commit_only_on_task_branches(repo: GitWorkspace) -> None:
    with pytest.raises(GitWorkspaceError, match="task branch"):
        repo.undo_last_commit()  # on main
    repo.branch_for_task("9")
    with pytest.raises(GitWorkspaceError, match="already on main"):
        repo.undo_last_commit()  # nothing of the task's own yet
    repo.workspace.write("keep.txt", "keep\n")
    repo.add()
    kept = repo.commit()
    repo.workspace.write("oops.txt", "oops\n")
    repo.add()
    oops = repo.commit()
    undone = repo.undo_last_commit()
    assert undone.sha == oops.sha and undone.files == ["oops.txt"]
    assert repo.log(1)[0].sha == kept.sha and not repo.workspace.exists("oops.txt")
    repo.checkout("main")
    with pytest.raises(GitWorkspaceError):
        repo.undo_last_commit()


def test_revisions_that_git_would_read_as_options_are_refused(repo: GitWorkspace, tmp_path: Path) -> None:
    """A revision or branch from a caller goes to git before any ``--``: ``--output=<file>`` would write a file."""
    target = tmp_path / "pwned"
    calls = {
        "diff": lambda: repo.diff(base=f"--output={target}"),
        "log": lambda: repo.log(rev=f"--output={target}"),
        "checkout": lambda: repo.checkout("-bevil"),
    }
    for name, call in calls.items():
        with pytest.raises(OptionLikeRevisionError, match="starts with '-'"):
            call()
        assert not target.exists(), name
    assert "evil" not in repo.repo.heads and repo.current_branch == "main"
    repo.branch_for_task("1")
    repo.workspace.write("main", "a file named like the branch\n")
    repo.add()
    repo.commit()
    repo.checkout("main")  # the branch, not the file
    assert repo.current_branch == "main" and repo.diff(base="task/1") and len(repo.log(rev="task/1")) == 2


def test_clone_of_a_local_repository(repo: GitWorkspace, tmp_path: Path) -> None:
    repo.branch_for_task("1")
    repo.workspace.write("lib.py", "def f():\n    return 1\n")
    repo.add()
    repo.commit()
    repo.merge_to_main("task/1", approved_by="lead")

    clone = GitWorkspace.init_or_clone(tmp_path / "clone", url=str(repo.root))
    assert clone.current_branch == "main"
    assert clone.workspace.read("lib.py") == "def f():\n    return 1\n"
    assert clone.log(1)[0].sha == repo.repo.heads["main"].commit.hexsha
    clone.branch_for_task("2")
    clone.workspace.write("lib.py", "def f():\n    return 2\n")
    clone.add()
    assert clone.commit().files == ["lib.py"]  # commits work in the clone with no global identity


# ---------------------------------------------------------------- test runner


def project(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "proj"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    return root


async def test_pytest_passing_suite(tmp_path: Path) -> None:
    root = project(
        tmp_path,
        {
            "tests/test_ok.py": """
                import pytest

                def test_one():
                    assert 1 + 1 == 2

                @pytest.mark.parametrize("n", [1, 2, 3])
                def test_many(n):
                    assert n > 0

                @pytest.mark.skip(reason="not today")
                def test_skipped():
                    pass
            """
        },
    )
    report = await run_tests(root, timeout_s=60)
    assert report.runner == "pytest"
    assert (report.passed, report.failed, report.errors, report.skipped, report.count) == (4, 0, 0, 1, 5)
    assert report.ok and report.exit_code == 0 and not report.timed_out and report.failures == []
    assert report.problem is None and report.duration_s > 0


async def test_pytest_failing_test_is_described(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_ADDOPTS", "--collect-only")  # an outer run's options must not leak in
    root = project(
        tmp_path,
        {
            "test_calc.py": """
                def add(a, b):
                    return a - b

                def test_add():
                    result = add(2, 2)
                    assert result == 4, "add is broken"

                def test_fine():
                    assert True
            """
        },
    )
    report = await run_pytest(root, timeout_s=60)
    assert (report.passed, report.failed, report.errors, report.count) == (1, 1, 0, 2)
    assert not report.ok and report.exit_code == 1
    [failure] = report.failures
    assert failure.name == "test_add" and failure.classname == "test_calc" and failure.kind == "failure"
    assert "add is broken" in failure.message and "assert 0 == 4" in failure.message
    assert "assert result == 4" in failure.traceback and "test_calc.py:7" in failure.traceback
    assert "1 failed, 1 passed" in report.output_tail


async def test_the_tests_see_none_of_the_services_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests are model-written and their failure messages are recorded in events: the service's keys, tokens
    and database URL must not be in their environment; what a run needs still is."""
    secrets = {
        "AGENTHUB_OPENAI_API_KEY": "sk-openai",
        "AGENTHUB_ANTHROPIC_API_KEY": "sk-ant",
        "AGENTHUB_API_TOKEN": "hub-token",
        "AGENTHUB_DATA_DIR": "/srv/agenthub",
        "DATABASE_URL": "postgresql://agenthub:pw@db/agenthub",
        "PGPASSWORD": "pw",
        "RAY_ADDRESS": "auto",
        "GITHUB_TOKEN": "ghp",
        "LC_SECRET": "lc",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    root = project(
        tmp_path,
        {
            "test_env.py": f"""
                import os

                def test_no_secrets():
                    assert sorted(k for k in {sorted(secrets)!r} if k in os.environ) == []
                    assert [v for v in os.environ.values() if v in {sorted(secrets.values())!r}] == []

                def test_what_a_run_needs():
                    assert os.environ["PATH"] and os.environ["HOME"] and os.environ["LC_ALL"] == "C.UTF-8"
            """
        },
    )
    report = await run_pytest(root, timeout_s=60)
    assert report.ok and report.passed == 2, [f.message for f in report.failures]


async def test_pytest_collection_error_is_a_report(tmp_path: Path) -> None:
    root = project(
        tmp_path,
        {"test_good.py": "def test_ok():\n    pass\n", "test_broken.py": "def test_x(:\n    pass\n"},
    )
    report = await run_pytest(root, timeout_s=60)
    assert report.errors == 1 and report.count == 0 and report.passed == 0 and not report.ok
    assert report.exit_code == 2 and report.problem and "collection" in report.problem
    [failure] = report.failures
    assert failure.kind == "error" and "test_broken" in failure.name and "SyntaxError" in failure.traceback


async def test_a_run_killed_from_outside_gives_no_report(tmp_path: Path) -> None:
    """Ray kills an actor's children before the actor's process ends, and the actor's code runs on for a moment:
    a report of such a run ("no tests ran") was recorded as a failed attempt. A SIGKILL the runner did not send
    is no verdict on the code: it raises. A run that crashes by another signal is still the tests' outcome."""
    kill = (
        "import os, signal\n\ndef test_passes():\n    pass\n\ndef test_x():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    with pytest.raises(RunKilledError, match=r"killed \(SIGKILL\) from outside"):
        await run_pytest(project(tmp_path / "killed", {"test_killed.py": kill}), timeout_s=60)
    abort = "import os\n\ndef test_x():\n    os.abort()\n"
    report = await run_pytest(project(tmp_path / "aborted", {"test_aborted.py": abort}), timeout_s=60)
    assert report.exit_code == -signal.SIGABRT and not report.ok and report.count == 0
    assert report.problem == f"pytest wrote no JUnit report (exit code {-signal.SIGABRT})"


@pytest.mark.parametrize("sigint", ["default", "ignored"])
async def test_pytest_timeout_is_bounded(tmp_path: Path, sigint: str) -> None:
    """Also when this process ignores SIGINT, as one started in the background by a CI shell does: the child
    inherits that, and must still be interrupted, not killed without a report."""
    root = project(
        tmp_path,
        {
            "test_slow.py": """
                import time

                def test_quick():
                    pass

                def test_sleeps():
                    time.sleep(60)
            """
        },
    )
    started = time.monotonic()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)
    try:
        report = await run_pytest(root, timeout_s=4)  # time for the child to start and pass test_quick
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 20
    assert report.timed_out and not report.ok and report.problem and "timed out" in report.problem
    # pytest was interrupted, so it still reported what had run, and where it hung.
    assert (report.passed, report.count, report.failed) == (1, 1, 0)
    assert report.problem.endswith("at test_slow.py:8") and "KeyboardInterrupt" in report.output_tail


def _gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for a parent that does not reap (PID 1 in a container)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _gone_soon(pid: int) -> bool:
    """``_gone`` within 5 s: SIGKILL is delivered at once, but not necessarily before we look."""
    for _ in range(100):
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


async def test_what_the_tests_start_in_the_background_does_not_outlive_the_run(tmp_path: Path) -> None:
    """A run that ends normally still kills its process group: a server or a ``sleep`` a test left behind."""
    from actors.tools.test_runner import _child_env, _run

    pid_file = tmp_path / "pid"
    script = f"sleep 60 > /dev/null 2>&1 & echo $! > {pid_file}"
    run = await _run(["sh", "-c", script], tmp_path, 30, _child_env())
    assert run.exit_code == 0 and not run.timed_out
    pid = int(pid_file.read_text())
    try:
        assert await asyncio.to_thread(_gone_soon, pid), "the background sleep outlived the run"
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


async def test_tests_run_below_the_role_that_starts_them(tmp_path: Path) -> None:
    """Model-written tests are batch work: they yield the CPU to the message path (the actors run at nice 0)."""
    from actors.tools.test_runner import NICE_STEPS, _child_env, _run

    run = await _run([sys.executable, "-c", "import os; print(os.nice(0))"], tmp_path, 30, _child_env())
    assert run.exit_code == 0 and int(run.output.strip()) == min(os.nice(0) + NICE_STEPS, 19)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_a_run_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A role actor killed mid-run (SIGKILL: no cleanup of its own) left its pytest running on, its timeout gone
    with the actor; what the tests started in the background outlives even that, until the next run ends it."""
    from actors.tools.test_runner import kill_orphans

    pid_file, bg_file = tmp_path / "pid", tmp_path / "bg"
    child = (
        "import os, subprocess, time; "
        f"bg = subprocess.Popen(['sleep', '120']); open({str(bg_file)!r}, 'w').write(str(bg.pid)); "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    starter = (  # stands in for the role actor: starts a run with a long timeout
        "import asyncio, sys; from pathlib import Path; from actors.tools.test_runner import _run; "
        f"asyncio.run(_run([sys.executable, '-c', {child!r}], Path({str(tmp_path)!r}), 600, {{}}))"
    )
    actor = subprocess.Popen([sys.executable, "-c", starter], cwd=Path(__file__).parents[1])
    pid = background = 0
    try:
        for _ in range(300):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.05)
        pid, background = int(pid_file.read_text()), int(bg_file.read_text())
        assert not _gone(pid)
        assert not {pid, background} & set(kill_orphans()), "a live runner's run is not an orphan"
        assert not _gone(pid) and not _gone(background)
        actor.kill()
        actor.wait(10)
        assert _gone_soon(pid), "the run outlived the process that started it"
        assert not _gone(background), "PR_SET_PDEATHSIG is not inherited: the background sleep is still there"
        assert background in kill_orphans()  # what the next run does first
        assert _gone_soon(background), "the orphan outlived the sweep"
    finally:
        actor.kill()
        for leftover in (pid, background):
            if leftover and not _gone(leftover):
                os.kill(leftover, signal.SIGKILL)


async def test_pytest_without_tests(tmp_path: Path) -> None:
    root = project(tmp_path, {"pyproject.toml": "[project]\nname = 'empty'\n", "lib.py": "x = 1\n"})
    report = await run_tests(root, timeout_s=60)
    assert report.count == 0 and report.exit_code == 5 and not report.ok and report.problem == "no tests were collected"


# ---------------------------------------------------------------- jest

JEST_INSTALL_BUDGET_S = 60


@pytest.fixture(scope="session")
def jest_modules(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """node_modules with jest 29, installed once (kept in the pytest cache between runs when it is enabled)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("jest test skipped: node/npm are not installed on this machine")
    cache = getattr(request.config, "cache", None)  # absent under `-p no:cacheprovider`
    base = cache.mkdir("agenthub-jest29") if cache is not None else tmp_path_factory.mktemp("jest29")
    with (base / "install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent sessions share the cache: one installs, the others wait
        if not (base / "installed.ok").exists():
            _install_jest(base)
    return base / "node_modules"


def _install_jest(base: Path) -> None:
    (base / "package.json").write_text('{"name": "jest-cache", "private": true}\n')
    started = time.monotonic()
    try:
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--fetch-retries=1", "jest@29"],
            cwd=base,
            capture_output=True,
            text=True,
            timeout=JEST_INSTALL_BUDGET_S,
            env={**os.environ, "CI": "true"},
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"jest test skipped: `npm install jest@29` took over {JEST_INSTALL_BUDGET_S}s")
    if done.returncode != 0:
        lines = [ln.removeprefix("npm error").removeprefix("npm ERR!").strip() for ln in done.stderr.splitlines()]
        reason = next((line for line in lines if "Error" in line), next((x for x in lines if x), "no output"))
        pytest.skip(f"jest test skipped: `npm install jest@29` failed (exit {done.returncode}): {reason}")
    (base / "installed.ok").write_text(f"jest@29 installed in {time.monotonic() - started:.1f}s\n")


async def test_jest_results_are_parsed(tmp_path: Path, jest_modules: Path) -> None:
    root = project(
        tmp_path,
        {
            "package.json": '{"name": "web", "private": true}\n',
            "sum.test.js": """
                const sum = (a, b) => a + b;
                describe('sum', () => {
                  test('adds', () => { expect(sum(1, 2)).toBe(3); });
                  test('is broken', () => { expect(sum(1, 1)).toBe(3); });
                  test.skip('later', () => {});
                });
            """,
            "broken.test.js": "test('x', () => {\n",
        },
    )
    (root / "node_modules").symlink_to(jest_modules, target_is_directory=True)
    report = await run_tests(root, timeout_s=60)
    assert report.runner == "jest"
    assert (report.passed, report.failed, report.skipped, report.count, report.errors) == (1, 1, 1, 3, 1)
    assert not report.ok and report.exit_code == 1
    failure = next(f for f in report.failures if f.kind == "failure")
    assert failure.name == "sum is broken" and failure.classname == "sum.test.js"
    assert "toBe" in failure.message and "Received: 2" in failure.traceback
    error = next(f for f in report.failures if f.kind == "error")
    assert error.classname == "broken.test.js" and "SyntaxError" in error.message

    (root / "broken.test.js").unlink()
    (root / "sum.test.js").write_text("test('adds', () => { expect(1 + 2).toBe(3); });\n")
    report = await run_jest(root, timeout_s=60)
    assert report.ok and (report.passed, report.count) == (1, 1)

    (root / "test_py.py").write_text("def test_py():\n    assert False, 'python side'\n")  # a mixed project
    report = await run_tests(root, timeout_s=60)
    assert report.runner == "pytest+jest" and (report.passed, report.failed, report.count) == (1, 1, 2)
    assert [f.name for f in report.failures] == ["test_py"] and not report.ok


async def test_jest_missing_is_a_report(tmp_path: Path) -> None:
    root = project(tmp_path, {"package.json": "{}\n"})
    report = await run_jest(root, timeout_s=5)
    assert not report.ok and report.problem and "not found" in report.problem


def test_git_repo_fixture_is_isolated_from_global_identity(repo: GitWorkspace) -> None:
    assert os.environ["GIT_CONFIG_NOSYSTEM"] == "1"
    with pytest.raises(git.GitCommandError):
        git.Git().config("--global", "user.name")  # no global identity here, and commits still work

"""A git workspace per project: a branch per task, generated commit messages, merges to main only with approval.

Built on gitpython. The repository carries its own user identity so commits work on machines with no global git
configuration, ``main`` only moves through an approved ``--no-ff`` merge (the approver is in the merge message),
and a failed merge is aborted so the working tree is never left half-merged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import git
from pydantic import BaseModel

from actors.tools.filesystem import Workspace

MAIN = "main"
TASK_PREFIX = "task/"
DEFAULT_NAME = "agenthub"
DEFAULT_EMAIL = "agenthub@localhost"
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class GitWorkspaceError(Exception):
    """Base of the git workspace's refusals."""


class ApprovalRequiredError(GitWorkspaceError, PermissionError):
    """Merging to main needs a named approver."""


class MergeConflictError(GitWorkspaceError):
    """The merge conflicted and was aborted; ``files`` are the conflicting paths."""

    def __init__(self, branch: str, files: list[str]) -> None:
        super().__init__(f"merging {branch} into {MAIN} conflicts in: {', '.join(files) or '(unknown files)'}")
        self.branch = branch
        self.files = files


class AlreadyMergedError(GitWorkspaceError):
    """The branch has nothing main lacks (e.g. a redelivered merge step); ``main_sha`` is main's head."""

    def __init__(self, branch: str, main_sha: str) -> None:
        super().__init__(f"{branch} has nothing to merge: it is already in {MAIN}")
        self.branch = branch
        self.main_sha = main_sha


class NothingToCommitError(GitWorkspaceError):
    """No staged changes: an empty commit would only add noise to the task's history."""


class DirtyWorkspaceError(GitWorkspaceError):
    """An operation that switches or rewrites branches would lose or carry over uncommitted changes."""


class OptionLikeRevisionError(GitWorkspaceError, ValueError):
    """A revision or branch name starting with ``-``: git would read it as an option (``--output=<file>`` of
    ``git diff`` writes any file)."""


class CommitInfo(BaseModel):
    sha: str
    message: str
    author: str
    files: list[str]
    branch: str | None
    at: datetime

    @property
    def summary(self) -> str:
        return self.message.splitlines()[0] if self.message else ""


def _one_line(text: str) -> str:
    """Names go into headers and trailers, where a newline could forge another one."""
    return " ".join(text.split())


def _revision(value: str, what: str) -> str:
    """``value`` when git can only read it as a revision, never as an option."""
    if value.startswith("-"):
        raise OptionLikeRevisionError(f"{what} {value!r} starts with '-', which git would read as an option")
    return value


def _email_for(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or DEFAULT_NAME
    return f"{slug}@agenthub.local"


class GitWorkspace:
    """One project's repository; ``workspace`` is the confined, undoable file tool over the same tree."""

    def __init__(self, root: Path | str) -> None:
        self.repo = git.Repo(Path(root))
        if self.repo.working_tree_dir is None:
            raise GitWorkspaceError(f"{root} is a bare repository; a workspace needs a working tree")
        self.root = Path(self.repo.working_tree_dir).resolve()
        self._workspace: Workspace | None = None
        self._ensure_identity()

    # ---- creation ----

    @classmethod
    def init_or_clone(cls, root: Path | str, url: str | None = None) -> GitWorkspace:
        """Open the repository at ``root``, or clone ``url`` (a URL or local path) there, or init a fresh one.

        A fresh repository starts on ``main`` with an empty initial commit, so task branches always have a base.
        """
        root = Path(root)
        if (root / ".git").exists():
            return cls(root)
        if url is not None:
            # No credential prompts (nobody is there to answer); gitpython refuses ext:: and other unsafe protocols.
            repo = git.Repo.clone_from(url, root, env={"GIT_TERMINAL_PROMPT": "0"})
            if MAIN not in repo.heads and repo.head.is_valid():
                remote_main = next((r for r in repo.remotes.origin.refs if r.remote_head == MAIN), None)
                repo.git.checkout("-b", MAIN, *([remote_main.name] if remote_main else []))
            ws = cls(root)
            if not ws.repo.head.is_valid():  # cloned an empty repository
                ws._initial_commit()
            return ws
        root.mkdir(parents=True, exist_ok=True)
        repo = git.Repo.init(root)
        repo.git.symbolic_ref("HEAD", f"refs/heads/{MAIN}")  # independent of init.defaultBranch and git version
        ws = cls(root)
        ws._initial_commit()
        return ws

    def _initial_commit(self) -> None:
        self.repo.git.symbolic_ref("HEAD", f"refs/heads/{MAIN}")
        self.repo.git.commit("--allow-empty", "--no-verify", "-m", "initial commit", author=self._actor(DEFAULT_NAME))

    def _ensure_identity(self) -> None:
        reader = self.repo.config_reader("repository")
        with self.repo.config_writer("repository") as writer:
            if not reader.has_option("user", "name"):
                writer.set_value("user", "name", DEFAULT_NAME)
            if not reader.has_option("user", "email"):
                writer.set_value("user", "email", DEFAULT_EMAIL)

    @staticmethod
    def _actor(name: str) -> str:
        name = _one_line(re.sub(r"[<>]", "", name)) or DEFAULT_NAME
        return f"{name} <{_email_for(name)}>"

    # ---- state ----

    @property
    def workspace(self) -> Workspace:
        """The confined file tool for this tree; one instance, so its undo journal spans the session."""
        if self._workspace is None:
            self._workspace = Workspace(self.root)
        return self._workspace

    @property
    def current_branch(self) -> str | None:
        """The checked-out branch, or None when HEAD is detached."""
        return None if self.repo.head.is_detached else self.repo.active_branch.name

    def is_dirty(self, *, untracked: bool = False) -> bool:
        return self.repo.is_dirty(untracked_files=untracked)

    def has_changes(self) -> bool:
        """Anything to commit: staged, unstaged or untracked (after ``add()`` that means staged)."""
        return self.repo.is_dirty(index=True, working_tree=True, untracked_files=True)

    def head_sha(self) -> str:
        return self.repo.head.commit.hexsha

    def _require_clean(self, doing: str) -> None:
        if self.repo.is_dirty(untracked_files=False):
            raise DirtyWorkspaceError(f"uncommitted changes; commit or discard them before {doing}")

    # ---- branches ----

    @staticmethod
    def task_branch(task_id: str) -> str:
        if not _TASK_ID.match(task_id) or ".." in task_id or task_id.endswith((".lock", ".")):
            raise ValueError(f"task id {task_id!r} is not usable in a branch name")
        return f"{TASK_PREFIX}{task_id}"

    def branch_for_task(self, task_id: str) -> str:
        """Check out ``task/<id>``, creating it from main the first time; returns the branch name."""
        name = self.task_branch(task_id)
        if self.current_branch == name:
            return name
        self._require_clean(f"switching to {name}")
        if name in self.repo.heads:
            self.repo.git.checkout(name)
        else:
            self.repo.git.checkout("-b", name, MAIN)
        return name

    def checkout(self, branch: str) -> None:
        _revision(branch, "branch")
        self._require_clean(f"switching to {branch}")
        self.repo.git.checkout(branch, "--")  # "--": a branch, never a file of that name

    # ---- staging and commits ----

    def add(self, paths: Sequence[str] | None = None) -> list[str]:
        """Stage ``paths`` (new, modified and deleted), or everything when None; returns the staged paths."""
        if paths is None:
            self.repo.git.add("-A")
        else:
            if isinstance(paths, str):
                paths = [paths]
            rels = [self.workspace.relative(self.workspace.resolve(p)) for p in paths]  # confined like file writes
            self.repo.git.add("-A", "--", *rels)
        return [path for _, _, path in self.staged_changes()]

    def staged_changes(self) -> list[tuple[int | None, int | None, str]]:
        """(added lines, deleted lines, path) per staged file; None counts for binary files."""
        out = self.repo.git.diff("--cached", "--numstat", "--no-renames", "-z")
        changes: list[tuple[int | None, int | None, str]] = []
        for record in out.split("\0"):
            if not record.strip():
                continue
            added, deleted, path = record.split("\t", 2)
            changes.append((None if added == "-" else int(added), None if deleted == "-" else int(deleted), path))
        return changes

    def generated_message(self) -> str:
        """A commit message from the staged diff: what task, how many files and lines, which files."""
        changes = self.staged_changes()
        status = dict(self._staged_status())
        branch = self.current_branch or "detached"
        subject = f"task {branch.removeprefix(TASK_PREFIX)}" if branch.startswith(TASK_PREFIX) else branch
        plus = sum(a or 0 for a, _, _ in changes)
        minus = sum(d or 0 for _, d, _ in changes)
        n = len(changes)
        lines = [f"{subject}: {n} file{'s' if n != 1 else ''} changed (+{plus} -{minus})", ""]
        for added, deleted, path in changes:
            counts = "binary" if added is None or deleted is None else f"+{added} -{deleted}"
            lines.append(f"{status.get(path, 'M')} {path} ({counts})")
        return "\n".join(lines) + "\n"

    def _staged_status(self) -> list[tuple[str, str]]:
        out = self.repo.git.diff("--cached", "--name-status", "--no-renames", "-z")
        parts = [p for p in out.split("\0") if p]
        return [(parts[i + 1], parts[i][0]) for i in range(0, len(parts) - 1, 2)]

    def commit(self, message: str | None = None, author: str = DEFAULT_NAME) -> CommitInfo:
        """Commit what is staged; the message is generated from the staged diff when not given."""
        if not self.staged_changes():
            raise NothingToCommitError("nothing staged to commit; call add() first")
        text = message if message and message.strip() else self.generated_message()
        self.repo.git.commit("--no-verify", "--cleanup=whitespace", "-m", text, author=self._actor(author))
        return self._info(self.repo.head.commit, self.current_branch)

    def undo_last_commit(self) -> CommitInfo:
        """Drop the last commit of a task branch (``reset --hard HEAD~1``); never on main or a commit main has.

        Returns the dropped commit; its sha stays reachable through the reflog.
        """
        branch = self.current_branch
        if branch is None or not branch.startswith(TASK_PREFIX):
            raise GitWorkspaceError(f"undo_last_commit only works on a task branch, not on {branch or 'detached HEAD'}")
        head = self.repo.head.commit
        if self.repo.is_ancestor(head, MAIN):
            raise GitWorkspaceError(f"the last commit on {branch} is already on {MAIN}: no task commit to undo")
        if not head.parents:
            raise GitWorkspaceError("cannot undo the root commit")
        self._require_clean("undoing a commit")
        info = self._info(head, branch)
        self.repo.git.reset("--hard", "HEAD~1")
        return info

    def discard_changes(self) -> None:
        """Put the working tree back at HEAD: tracked files reset, untracked ones removed (ignored ones kept), so a
        step that failed half-way leaves nothing behind for the next one to trip over or commit."""
        self.repo.git.reset("--hard", "HEAD")
        self.repo.git.clean("-fd")

    # ---- merging ----

    def merge_to_main(self, branch: str, approved_by: str, author: str = DEFAULT_NAME) -> CommitInfo:
        """Merge ``branch`` into main with a ``--no-ff`` merge commit that records the approver.

        Refuses without an approver. On conflict the merge is aborted (clean tree) and MergeConflictError lists the
        files. HEAD is returned to the branch that was checked out before.
        """
        if not approved_by or not approved_by.strip():
            raise ApprovalRequiredError(f"merging {branch} into {MAIN} needs approval: approved_by is empty")
        if branch == MAIN:
            raise GitWorkspaceError(f"cannot merge {MAIN} into itself")
        if branch not in self.repo.heads:
            raise GitWorkspaceError(f"no branch named {branch}")
        main_head = self.repo.heads[MAIN].commit
        if self.repo.is_ancestor(self.repo.heads[branch].commit, main_head):
            raise AlreadyMergedError(branch, main_head.hexsha)
        self._require_clean(f"merging {branch}")
        previous = self.current_branch or self.repo.head.commit.hexsha
        message = f"Merge {branch} into {MAIN}\n\nApproved-by: {_one_line(approved_by)}\n"
        self.repo.git.checkout(MAIN)
        name, _, email = self._actor(author).partition(" <")
        identity = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email.rstrip(">")}
        try:
            try:
                with self.repo.git.custom_environment(**identity):
                    self.repo.git.merge("--no-ff", "--no-edit", "--no-verify", "-m", message, branch)
            except git.GitCommandError as e:
                conflicted = self.repo.git.diff("--name-only", "--diff-filter=U", "-z").split("\0")
                files = sorted(f for f in conflicted if f)
                if (self.root / ".git" / "MERGE_HEAD").exists():
                    self.repo.git.merge("--abort")
                if files:
                    raise MergeConflictError(branch, files) from e
                raise GitWorkspaceError(f"merge of {branch} failed: {e.stderr.strip()}") from e
            return self._info(self.repo.heads[MAIN].commit, MAIN)
        finally:
            if previous != MAIN:
                self.repo.git.checkout(previous)

    # ---- history ----

    def log(self, n: int = 10, rev: str | None = None) -> list[CommitInfo]:
        """The last ``n`` commits of ``rev`` (HEAD by default), newest first."""
        if rev is not None:
            _revision(rev, "revision")
        heads = {h.name for h in self.repo.heads}
        branch = self.current_branch if rev is None else rev if rev in heads else None
        return [self._info(c, branch) for c in self.repo.iter_commits(rev or "HEAD", max_count=n)]

    def diff(self, base: str | None = None, *, staged: bool = False, paths: Sequence[str] | None = None) -> str:
        """Unified diff: working tree vs index by default, the index with ``staged``, or against ``base``."""
        args: list[str] = ["--no-color"]
        if staged:
            args.append("--cached")
        if base:
            args.append(_revision(base, "base"))
        if paths:
            args += ["--", *(self.workspace.relative(self.workspace.resolve(p)) for p in paths)]
        return self.repo.git.diff(*args)

    def _info(self, commit: git.Commit, branch: str | None) -> CommitInfo:
        if commit.parents:
            out = self.repo.git.diff("--name-only", "--no-renames", "-z", commit.parents[0].hexsha, commit.hexsha)
        else:
            out = self.repo.git.diff_tree("--root", "--no-commit-id", "--name-only", "-r", "-z", commit.hexsha)
        message = commit.message if isinstance(commit.message, str) else commit.message.decode("utf-8", "replace")
        return CommitInfo(
            sha=commit.hexsha,
            message=message,
            author=str(commit.author.name),
            files=sorted(f for f in out.split("\0") if f),
            branch=branch,
            at=commit.committed_datetime,
        )


init_or_clone = GitWorkspace.init_or_clone

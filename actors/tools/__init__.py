"""Tools for the developer-agent team: a confined, undoable file system, a git workspace, an AST outline, tests."""

from __future__ import annotations

from actors.tools.ast_outline import OutlineError, OutlineItem, outline, outline_file
from actors.tools.filesystem import (
    FileChange,
    FileTooLargeError,
    NotTextError,
    PathEscapeError,
    UndoConflictError,
    Workspace,
    WorkspaceError,
)
from actors.tools.git_workspace import (
    AlreadyMergedError,
    ApprovalRequiredError,
    CommitInfo,
    DirtyWorkspaceError,
    GitWorkspace,
    GitWorkspaceError,
    MergeConflictError,
    NothingToCommitError,
    OptionLikeRevisionError,
    init_or_clone,
)
from actors.tools.test_runner import (
    RunKilledError,
    TestFailure,
    TestReport,
    kill_orphans,
    run_jest,
    run_pytest,
    run_tests,
)

__all__ = [
    "AlreadyMergedError",
    "ApprovalRequiredError",
    "CommitInfo",
    "DirtyWorkspaceError",
    "FileChange",
    "FileTooLargeError",
    "GitWorkspace",
    "GitWorkspaceError",
    "MergeConflictError",
    "NotTextError",
    "NothingToCommitError",
    "OptionLikeRevisionError",
    "OutlineError",
    "OutlineItem",
    "PathEscapeError",
    "RunKilledError",
    "TestFailure",
    "TestReport",
    "UndoConflictError",
    "Workspace",
    "WorkspaceError",
    "init_or_clone",
    "kill_orphans",
    "outline",
    "outline_file",
    "run_jest",
    "run_pytest",
    "run_tests",
]

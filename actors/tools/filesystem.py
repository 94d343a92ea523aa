"""A file-system tool confined to one workspace directory, with an undo journal of every change.

Agents get paths from an LLM, so every path is checked: absolute paths, ``..`` escapes and symlinks that lead
outside the root are refused, and ``.git`` is never exposed (writing hooks there would run code outside the tool).
Every mutation is journaled with the content before and after, so any change can be undone exactly.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections import deque
from datetime import UTC, datetime
from pathlib import Path, PurePath, PurePosixPath
from typing import Literal
from uuid import uuid4

from pydantic import BaseModel, Field

DEFAULT_MAX_FILE_BYTES = 1024 * 1024
PROTECTED_DIRS = frozenset({".git"})

Action = Literal["created", "modified", "deleted"]


_MAGIC = re.compile(r"[*?[]")


def _match_segments(parts: list[str], pattern: list[str], include_hidden: bool) -> bool:
    """Glob match of path segments against pattern segments, ``**`` standing for zero or more segments."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        if _match_segments(parts, rest, include_hidden):
            return True
        return (
            bool(parts)
            and (include_hidden or not parts[0].startswith("."))
            and _match_segments(parts[1:], pattern, include_hidden)
        )
    if not parts:
        return False
    if parts[0].startswith(".") and not head.startswith(".") and not include_hidden:
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _match_segments(parts[1:], rest, include_hidden)


class WorkspaceError(Exception):
    """Base of the errors this tool reports to an agent (so callers can catch them as one)."""


class PathEscapeError(WorkspaceError, ValueError):
    """A path that would leave the workspace (absolute, ``..``, a symlink to outside) or enter ``.git``."""


class FileTooLargeError(WorkspaceError, ValueError):
    """Reads and writes are bounded so one file cannot flood an agent's context or the journal."""


class NotTextError(WorkspaceError, ValueError):
    """The tool deals in UTF-8 text; binary files are refused rather than mangled."""


class UndoConflictError(WorkspaceError):
    """The file changed again after the change being undone; undoing would silently lose that later edit."""


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


class FileChange(BaseModel):
    """One journaled mutation: enough to show a diff and to restore the previous content."""

    id: str = Field(default_factory=lambda: uuid4().hex)
    path: str
    action: Action
    before: str | None
    after: str | None
    sha256_before: str | None = None
    sha256_after: str | None = None
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def model_post_init(self, _context: object) -> None:
        if self.sha256_before is None:
            self.sha256_before = sha256_text(self.before)
        if self.sha256_after is None:
            self.sha256_after = sha256_text(self.after)


class Workspace:
    """Read, write, create, delete and find files under ``root``, and never anywhere else."""

    def __init__(
        self, root: Path | str, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, max_journal: int = 1000
    ) -> None:
        self.root = Path(root).resolve(strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"workspace root {self.root} is not a directory")
        self.max_file_bytes = max_file_bytes
        self._journal: deque[FileChange] = deque(maxlen=max_journal)

    # ---- paths ----

    def resolve(self, rel: str | PurePath) -> Path:
        """The absolute path for ``rel``, or PathEscapeError if it is not inside the workspace."""
        rel_path = PurePath(rel)
        if rel_path.is_absolute() or rel_path.drive:
            raise PathEscapeError(f"absolute paths are not allowed in the workspace: {rel}")
        # strict=False: the target may not exist yet, but every symlink that does exist is followed.
        target = (self.root / rel_path).resolve(strict=False)
        if not target.is_relative_to(self.root):
            raise PathEscapeError(f"path escapes the workspace: {rel}")
        if protected := PROTECTED_DIRS.intersection(target.relative_to(self.root).parts):
            raise PathEscapeError(f"path is inside {min(protected)}, which the workspace does not expose: {rel}")
        return target

    def relative(self, path: Path) -> str:
        """The posix path of ``path`` relative to the root (the form every result uses)."""
        return path.relative_to(self.root).as_posix() or "."

    def exists(self, rel: str | PurePath) -> bool:
        return self.resolve(rel).exists()

    # ---- reading ----

    def read(self, rel: str | PurePath) -> str:
        return self._read(self.resolve(rel), rel)

    def _read(self, path: Path, rel: str | PurePath) -> str:
        size = path.stat().st_size
        if size > self.max_file_bytes:
            raise FileTooLargeError(f"{rel} is {size} bytes; the limit is {self.max_file_bytes} bytes")
        try:
            # bytes + decode keeps line endings exactly as stored (read_text would translate \r\n).
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise NotTextError(f"{rel} is not UTF-8 text") from e

    def list_dir(self, rel: str | PurePath = ".") -> list[str]:
        """Entries of a directory as workspace-relative paths, directories with a trailing ``/``."""
        path = self.resolve(rel)
        out: list[str] = []
        for child in sorted(path.iterdir(), key=lambda p: p.name):
            if child.name in PROTECTED_DIRS and path == self.root:
                continue
            name = (PurePosixPath(self.relative(path)) / child.name).as_posix().removeprefix("./")
            out.append(name + "/" if child.is_dir() else name)
        return out

    def find(self, pattern: str, *, include_hidden: bool = False, limit: int = 10_000) -> list[str]:
        """Files and directories matching a glob such as ``**/*.py``, as sorted relative posix paths.

        Glob semantics per path segment (``*``, ``?``, ``[...]``; ``**`` is any number of directories); hidden names
        match only a pattern segment that starts with ``.``, unless ``include_hidden``. The walk never follows
        symlinked directories (no loops, no escapes), never enters ``.git``, and drops any match that resolves
        outside the root.
        """
        segments = [seg for seg in PurePosixPath(pattern).parts if seg not in ("", ".")]
        if PurePosixPath(pattern).is_absolute() or ".." in segments:
            raise PathEscapeError(f"glob patterns must stay inside the workspace: {pattern}")
        if not segments:
            return []
        literal = 0  # leading segments without wildcards: start the walk there rather than at the root
        while literal < len(segments) - 1 and not _MAGIC.search(segments[literal]):
            literal += 1
        try:
            start = self.resolve(PurePosixPath(*segments[:literal])) if literal else self.root
        except PathEscapeError:
            return []  # e.g. a symlinked directory that leads outside: there is nothing of ours there
        if not start.is_dir():
            return []
        rest = segments[literal:]
        hidden = include_hidden or any(seg.startswith(".") for seg in rest)
        max_depth = None if "**" in rest else len(rest)
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start, followlinks=False):
            here = Path(dirpath)
            depth = len(here.relative_to(start).parts)
            dirnames[:] = sorted(d for d in dirnames if d not in PROTECTED_DIRS and (hidden or not d.startswith(".")))
            for name in [*dirnames, *sorted(filenames)]:
                rel_parts = [*here.relative_to(start).parts, name]
                if not _match_segments(rel_parts, rest, include_hidden):
                    continue
                rel = (here / name).relative_to(self.root)
                try:
                    self.resolve(rel)  # a symlink whose target is outside
                except PathEscapeError:
                    continue
                found.append(rel.as_posix())
                if len(found) >= limit:
                    return sorted(found)
            if max_depth is not None and depth + 1 >= max_depth:
                dirnames[:] = []
        return sorted(found)

    # ---- mutations (all journaled) ----

    def write(self, rel: str | PurePath, text: str) -> FileChange:
        """Create or overwrite a text file (parent directories are created)."""
        path = self.resolve(rel)
        before = self._read(path, rel) if path.exists() else None
        self._write(path, rel, text)
        return self._record(path, "created" if before is None else "modified", before, text)

    def create(self, rel: str | PurePath, text: str = "") -> FileChange:
        """Create a new file; refuses to overwrite, so an agent cannot clobber a file it did not read."""
        path = self.resolve(rel)
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{rel} already exists")
        self._write(path, rel, text)
        return self._record(path, "created", None, text)

    def delete(self, rel: str | PurePath) -> FileChange:
        """Delete a file (not a directory, so the journal can always put back what was removed)."""
        path = self.resolve(rel)
        if path.is_dir():
            raise IsADirectoryError(f"{rel} is a directory; only files can be deleted")
        before = self._read(path, rel)
        path.unlink()
        return self._record(path, "deleted", before, None)

    def _write(self, path: Path, rel: str | PurePath, text: str) -> None:
        data = text.encode("utf-8")
        if len(data) > self.max_file_bytes:
            raise FileTooLargeError(f"{len(data)} bytes for {rel}; the limit is {self.max_file_bytes} bytes")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def _record(self, path: Path, action: Action, before: str | None, after: str | None) -> FileChange:
        change = FileChange(path=self.relative(path), action=action, before=before, after=after)
        self._journal.append(change)
        return change

    # ---- backup / undo ----

    @property
    def history(self) -> list[FileChange]:
        """Journaled changes, oldest first (bounded by ``max_journal``)."""
        return list(self._journal)

    def undo(self, change: FileChange, *, force: bool = False) -> FileChange:
        """Put the file back as it was before ``change``; returns the restoring change (not journaled).

        Refuses (UndoConflictError) when the file no longer holds what ``change`` wrote, unless ``force``.
        """
        path = self.resolve(change.path)
        current = self._read(path, change.path) if path.exists() else None
        if not force and sha256_text(current) != change.sha256_after:
            raise UndoConflictError(f"{change.path} changed after this change was made; undo the later change first")
        if change.before is None:
            if path.exists():
                path.unlink()
        else:
            self._write(path, change.path, change.before)
        for i, recorded in enumerate(self._journal):
            if recorded.id == change.id:
                del self._journal[i]
                break
        action: Action = "deleted" if change.before is None else "created" if current is None else "modified"
        return FileChange(path=change.path, action=action, before=current, after=change.before)

    def undo_last(self) -> FileChange | None:
        """Undo the most recent journaled change; None when there is nothing left to undo."""
        if not self._journal:
            return None
        return self.undo(self._journal[-1])

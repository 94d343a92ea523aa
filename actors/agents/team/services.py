"""What team entities need from their actor: run configs, the LLM, spending, and the run's git workspace."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from actors.agents.team.roles import role as role_of
from actors.llm.budget import BudgetExceededError, spent_usd
from actors.llm.providers import ChatMessage, Completion, CompletionRequest, completed_event
from actors.tools import GitWorkspace
from events import NewEvent, RecordedEvent
from storage.eventlog import EventLog

T = TypeVar("T")
# A team entity's completion is recorded as its own step (``TeamServices.ask``): one that loses a version conflict
# (the task was cancelled or handed on meanwhile) is still recorded, since it was paid for (``Entity.conflict_keeps``)
PAID = frozenset({"llm.completed"})
CRASH_REASON_CHARS = 500


def crash_reason(what: str, error: Exception, workspaces: Path) -> str:
    """``what: Type: message``, for the reason of a step that kept failing: the paths of an OS error under
    ``workspaces`` made relative (the run's workspace and the file), NUL left out (the log refuses it), cut to
    ``CRASH_REASON_CHARS``."""
    why = f"{what}: {type(error).__name__}: {error}".replace("\x00", "")
    return relative(why, workspaces)[:CRASH_REASON_CHARS]


def relative(text: str, root: Path) -> str:
    """``text`` with paths under ``root`` relative to it, and ``root`` itself as ``.``; a sibling named like it
    (``root-fork``) is left alone."""
    escaped = re.escape(str(root))
    inside = re.sub(escaped + "/", "", text)
    return re.sub(escaped + r"(?![\w.\-])", ".", inside)


class RunConfig(BaseModel):
    """A run's settings, folded from ``run.started`` / ``run.forked`` (a fork overrides model and prompts)."""

    run_id: str
    goal: str = ""
    strategy: list[str] = Field(default_factory=list)
    budget_usd: float | None = None
    model: str | None = None
    provider: str = "scripted"
    prompts: dict[str, str] = Field(default_factory=dict)
    max_generated_tasks: int = 5
    ceo_interval_s: float = 2.0
    workspace: str | None = None
    forked_from: str | None = None


def fold_run(events: list[RecordedEvent]) -> RunConfig | None:
    cfg: RunConfig | None = None
    for e in events:
        if e.type == "run.started":
            cfg = RunConfig.model_validate({k: v for k, v in e.data.items() if k in RunConfig.model_fields})
        elif e.type == "run.forked" and cfg is not None:
            cfg.run_id, cfg.forked_from = e.data["run_id"], e.data["from_run"]
            cfg.workspace = None  # its own repository, rebuilt from its events: the original's stays untouched
            cfg.model = e.data.get("model") or cfg.model
            cfg.prompts = {**cfg.prompts, **e.data.get("prompts", {})}
    return cfg


class Completed(BaseModel):
    text: str
    structured: dict[str, Any] | None = None


MAX_CACHED_RUNS = 256


class TeamServices:
    def __init__(self, store: EventLog, complete: Callable[[CompletionRequest], Any], workspaces: Path) -> None:
        self.store = store
        self._complete = complete
        self.workspaces = workspaces
        self._runs: dict[str, RunConfig] = {}

    async def run(self, run_id: str) -> RunConfig:
        """The run's config, folded once and cached; the cache is emptied when it reaches ``MAX_CACHED_RUNS`` (a
        role serves runs for as long as it lives, and a fold of a run's stream is one cheap read)."""
        if run_id not in self._runs:
            cfg = fold_run(await self.store.read_stream(f"run-{run_id}"))
            if cfg is None:
                raise LookupError(f"unknown run {run_id!r}")
            if len(self._runs) >= MAX_CACHED_RUNS:
                self._runs.clear()
            self._runs[run_id] = cfg
        return self._runs[run_id]

    def cached_run(self, run_id: str) -> RunConfig | None:
        """The run's config if it was folded already; for what cannot wait on the log (``Run.crashed``)."""
        return self._runs.get(run_id)

    async def ask(
        self,
        completions: dict[str, Completed],
        purpose: str,
        role_name: str,
        run: RunConfig,
        prompt: str,
        schema: dict[str, Any] | None = None,
        *,
        recorder: str | None = None,
    ) -> tuple[list[NewEvent], Completed | None]:
        """The recorded answer for ``purpose``, or the ``llm.completed`` event to record first.

        Answers are read from the entity's state (folded from the log), so a replayed or redelivered step never
        calls the provider again. ``recorder`` names the stream that records the answer: asking again for the
        same purpose means the earlier answer was never recorded, and its cost is recorded with the cached one."""
        if purpose in completions:
            return [], completions[purpose]
        if run.budget_usd is not None:
            spent = await spent_usd(self.store, "run_id", run.run_id)
            if spent >= run.budget_usd:
                raise BudgetExceededError("run", spent, run.budget_usd)
        cfg = role_of(role_name).config
        request = CompletionRequest(
            provider=run.provider,
            model=run.model or cfg.model,
            messages=[
                ChatMessage(role="system", content=run.prompts.get(role_name, cfg.system_prompt)),
                ChatMessage(role="user", content=prompt),
            ],
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            response_schema=schema,
            agent_id=role_name,
            run_id=run.run_id,
            record_key=f"{recorder}:{purpose}" if recorder else None,
        )
        c: Completion = await self._complete(request)
        payload = completed_event(c, request, role_name, run_id=run.run_id, purpose=purpose, structured=c.structured)
        event = NewEvent.of(payload, actor=f"role:{role_name}")
        return [event], None

    def workspace_dir(self, run: RunConfig) -> Path:
        """The run's git workspace, named by the run (by default its id) under the workspaces dir."""
        return self.workspaces / (run.workspace or run.run_id)

    async def in_workspace(self, run: RunConfig, fn: Callable[[Path], T]) -> T:
        """Run blocking git/file/test work in a thread, one actor at a time per workspace (a file lock). A fork's
        repository, new, first gets on ``main`` what the tasks merged before the fork point recorded."""
        root = self.workspace_dir(run)
        merged = await self._merged(run.run_id) if run.forked_from and not (root / ".git").exists() else []

        def locked() -> T:
            root.mkdir(parents=True, exist_ok=True)
            with _flock(root.parent / f".{root.name}.lock"):
                if merged and not (root / ".git").exists():
                    _replay_merged(root, merged)
                return fn(root)

        return await asyncio.to_thread(locked)

    async def _merged(self, run_id: str) -> list[tuple[str, dict[str, str]]]:
        """The run's merged tasks, in the order they were merged, each with every file its events recorded."""
        rows = await self.store.fetch(
            "SELECT type, data FROM events WHERE data->>'run_id' = $1 "
            "AND type IN ('task.files_written', 'task.merged') ORDER BY position",
            run_id,
        )
        files: dict[str, dict[str, str]] = {}
        merged: list[tuple[str, dict[str, str]]] = []
        for r in rows:
            task = r["data"]["task_id"]
            if r["type"] == "task.files_written":
                files.setdefault(task, {}).update(r["data"]["files"])
            else:
                merged.append((task, files.get(task, {})))
        return merged


def _replay_merged(root: Path, merged: list[tuple[str, dict[str, str]]]) -> None:
    """A commit on ``main`` per merged task, with the files the log recorded for it."""
    repo = GitWorkspace.init_or_clone(root)
    for task_id, files in merged:
        for path, content in files.items():
            repo.workspace.write(path, content)
        if repo.add():
            repo.commit(f"{task_id}: merged before the fork point, rebuilt from the log", author="fork")


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

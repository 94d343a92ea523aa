"""``export_parquet`` replaces its file only with a whole export."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from events import NewEvent
from events.hub import AgentStarted
from storage.errors import StoreUnavailable
from storage.eventlog import EventLog
from storage.export import export_parquet


def snapshot(out: Path) -> tuple[bytes, list[Path]]:
    """The file's bytes and what its directory holds (a ``.part`` left over, say)."""
    return out.read_bytes(), sorted(out.parent.iterdir())


@pytest.fixture
async def previous(eventlog: EventLog, tmp_path: Path) -> Path:
    """A whole export of three events, then a fourth event for the next run to write."""
    for i in range(3):
        await eventlog.append(f"agent-{i}", [NewEvent.of(AgentStarted())])
    out = tmp_path / "log.parquet"
    assert await export_parquet(eventlog, out) == 3
    await eventlog.append("agent-3", [NewEvent.of(AgentStarted())])
    return out


async def test_a_store_failure_after_the_first_page_keeps_the_previous_file(
    eventlog: EventLog, previous: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ParquetWriter`` truncated the file at once and closed it with a valid footer on the error: the previous
    export was gone, replaced by a well-formed first page."""
    before = snapshot(previous)
    read_committed = eventlog.read_committed
    calls = 0

    async def fails_on_the_second_page(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise StoreUnavailable("connection lost")
        return await read_committed(*args, **kwargs)

    monkeypatch.setattr(eventlog, "read_committed", fails_on_the_second_page)
    with pytest.raises(StoreUnavailable):
        await export_parquet(eventlog, previous, page=1)
    assert snapshot(previous) == before


async def test_an_interrupted_export_keeps_the_previous_file(eventlog: EventLog, previous: Path) -> None:
    """Ctrl-C under ``asyncio.run`` cancels the export's task: a ``BaseException``, not an ``Exception``."""
    before = snapshot(previous)
    task = asyncio.create_task(export_parquet(eventlog, previous, page=1, progress=lambda _: task.cancel()))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert snapshot(previous) == before


async def test_a_whole_export_replaces_the_previous_file(eventlog: EventLog, previous: Path) -> None:
    assert await export_parquet(eventlog, previous, page=1) == 4
    assert len(pq.read_table(previous)) == 4
    assert snapshot(previous)[1] == [previous]
